"""The pack in a real browser: Debian's Chromium driven by Playwright against a real ComfyUI server on 127.0.0.1.

Every workflow loads with all its nodes known; the GRPO trainer's live chart holds exactly the rewards the server
logged, survives a page reload mid-run and a save / reopen; stray messages raise no console error. Screenshots of
each workflow go to $UNIPIC2_SCREENSHOTS (the README's pictures) or a temp folder.
"""

import json
import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from comfyui_runner import PACK_DIR, Server, prepare_host
from demo import LOADERS, SAMPLE_IMAGE

CHROMIUM = "/usr/bin/chromium"
# Headless in a closed network: no background connections, no GPU, a throwaway profile (as root: no sandbox).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
GRPO = PACK_DIR / "workflows" / "unipic2_grpo_t2i.json"
STEP_LINE = re.compile(r"UniPic2 GRPO step (\d+)/(\d+): reward (-?[\d.]+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_kontext_dir, tiny_metaquery_dir):
    work = tmp_path_factory.mktemp("browser")
    server = Server(prepare_host(work), work)
    for loader, folder in (("LoadUniPic2Kontext", tiny_kontext_dir), ("LoadUniPic2MetaQuery", tiny_metaquery_dir)):
        (server.models / "unipic2" / LOADERS[loader][1]).symlink_to(folder, target_is_directory=True)
    (server.input / SAMPLE_IMAGE.name).write_bytes(SAMPLE_IMAGE.read_bytes())
    server.wait_ready()
    yield server
    server.stop()


class Browser:
    def __init__(self, server, page):
        self.server, self.page = server, page
        self.errors: list[str] = []
        # Network noise is not ours: the current frontend reaches for outside resources this closed network lacks.
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                and not m.text.startswith("Failed to load resource") else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self):
        self.page.goto(self.server.url)
        self.page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types"
                                    "?.UniPic2GRPOTrainer", timeout=60_000)

    def load(self, workflow: dict):
        self.page.evaluate("async (w) => { await window.app.loadGraphData(w); }", workflow)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def fit_and_screenshot(self, path: Path):
        self.js("""() => {
            const nodes = window.app.graph._nodes, canvas = window.app.canvas;
            const xs = nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);
            const ys = nodes.flatMap(n => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
            const [w, h] = [canvas.canvas.width, canvas.canvas.height];
            const scale = Math.min(w / (Math.max(...xs) - Math.min(...xs) + 80),
                                   h / (Math.max(...ys) - Math.min(...ys) + 80), 1);
            canvas.ds.scale = scale;
            canvas.ds.offset = [40 / scale - Math.min(...xs), 40 / scale - Math.min(...ys)];
            canvas.setDirty(true, true);
            canvas.draw(true, true);
        }""")
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))

    def use_tiny_checkpoints(self):
        """Point the loaders at the tiny checkpoints (the workflows name the official repos)."""
        self.js("""(tiny) => window.app.graph._nodes.filter(n => tiny[n.type]).forEach(n => {
            n.widgets.find(w => w.name === "checkpoint").value = tiny[n.type];
        })""", {loader: tiny for loader, (_, tiny, _) in LOADERS.items()})

    def wait_for_history(self, steps: int, timeout_s: int = 240):
        try:
            self.page.wait_for_function("""(steps) => (window.app.graph._nodes.find(n => n.type ===
                "UniPic2GRPOTrainer")?.properties?.unipic2_history?.length ?? 0) >= steps""", arg=steps,
                                        timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            pytest.fail(f"no {steps} training steps on the chart; server log:\n{self.server.log()[-4000:]}")

    def trainer_history(self):
        return self.js("""() => {
            const node = window.app.graph._nodes.find(n => n.type === "UniPic2GRPOTrainer");
            return node?.properties?.unipic2_history ?? null;
        }""")


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = chromium.new_page(viewport={"width": 2400, "height": 1300})
        page.set_default_timeout(60_000)
        browser = Browser(server, page)
        browser.open()
        yield browser
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("UNIPIC2_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_workflow_loads_with_every_node_known(browser, screenshots, workflow):
    data = json.loads(workflow.read_text())
    before = len(browser.errors)
    browser.load(data)
    loaded = browser.js("""() => window.app.graph._nodes.map(n => ({
        type: n.type, known: !!window.LiteGraph.registered_node_types[n.type], red: !!n.has_errors,
        widgets: (n.widgets ?? []).length }))""")
    assert sorted(n["type"] for n in loaded) == sorted(n["type"] for n in data["nodes"])
    assert [n for n in loaded if not n["known"] or n["red"]] == []
    assert browser.errors[before:] == []
    path = screenshots / f"{workflow.stem}.png"
    browser.fit_and_screenshot(path)
    assert path.stat().st_size > 10_000


def test_training_chart_follows_the_server_and_survives_reload_and_save(browser, server, screenshots):
    browser.load(json.loads(GRPO.read_text()))
    browser.use_tiny_checkpoints()
    browser.js("async () => { await window.app.queuePrompt(0, 1); }")
    browser.wait_for_history(3)
    browser.page.wait_for_timeout(1500)  # the frontend stores the workflow every second
    browser.page.reload()  # mid-run: the restored workflow keeps the chart, later messages complete it
    browser.open()
    browser.wait_for_history(3, timeout_s=10)  # restored at once, not rebuilt from later steps
    browser.wait_for_history(10)

    browser.fit_and_screenshot(screenshots / "training_chart.png")
    logged = {int(step): float(reward) for step, _, reward in STEP_LINE.findall(server.log())}
    history = browser.trainer_history()
    assert [entry["step"] for entry in history] == list(range(1, 11))
    assert {entry["step"]: round(entry["rewards"]["total"][0], 4) for entry in history} == logged

    saved = browser.js("() => window.app.graph.serialize()")
    browser.js("() => window.app.graph.clear()")
    assert browser.trainer_history() is None
    browser.load(saved)
    assert browser.trainer_history() == history  # a saved workflow reopened shows the last chart


def test_stray_messages_are_ignored_without_console_errors(browser):
    browser.load(json.loads(GRPO.read_text()))
    before = len(browser.errors)
    trainer_id = browser.js("""async () => {
        const { api } = await import("/scripts/api.js");
        const send = (detail) => api.dispatchEvent(new CustomEvent("unipic2.grpo", { detail }));
        const entry = { step: 1, rewards: { total: [0.5, 0.1] }, loss: 0, kl: 0 };
        send({ node: 99999, total: 1, history: [entry] });  // no such node
        send({ node: 1, total: 1, history: [entry] });  // a node of another type (the loader)
        send({ history: "garbage" });
        const trainer = window.app.graph._nodes.find(n => n.type === "UniPic2GRPOTrainer");
        window.app.graph.remove(trainer);
        send({ node: trainer.id, total: 1, history: [entry] });  // deleted
        window.app.canvas.draw(true, true);
        return trainer.id;
    }""")
    browser.page.wait_for_timeout(500)
    assert browser.errors[before:] == []
    assert browser.js("(id) => window.app.graph.getNodeById(id)", trainer_id) is None
    assert browser.js("() => window.app.graph.getNodeById(1).properties.unipic2_history ?? null") is None
