"""The Comfy Registry metadata agrees with the rest of the repository (no ComfyUI needed).

pyproject.toml's dependencies are requirements.txt's, [tool.comfy] has what the registry asks for, LICENSE is the
GPL-3.0 that `license = {file = "LICENSE"}` points at, and the publish workflow publishes from the repository's owner.
"""

import re
import tomllib

import yaml

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PUBLISH = ROOT / ".github" / "workflows" / "publish.yml"


def requirement_lines(text: str) -> list[str]:
    """The requirements of a requirements file, in order: pip's comment rule (`#` at the start or after whitespace)."""
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_requirement_lines_drop_comments_and_blank_lines():
    text = "# header\n\naccelerate>=1.0  # why\nnumpy\n"
    assert requirement_lines(text) == ["accelerate>=1.0", "numpy"]


def test_pyproject_dependencies_are_requirements_txt():
    assert PYPROJECT["project"]["dependencies"] == requirement_lines((ROOT / "requirements.txt").read_text())


def test_pyproject_never_pins_torch():
    assert not any(re.match(r"torch\b", dep) for dep in PYPROJECT["project"]["dependencies"])


def test_pyproject_is_metadata_only():
    assert "build-system" not in PYPROJECT  # pip never builds the pack; it reads requirements.txt


def test_tool_comfy_has_the_registry_keys():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert isinstance(comfy["Icon"], str)  # a URL, or "" until the pack has one
    assert comfy["includes"] == []


def test_project_names_a_semantic_version_and_the_licence_file():
    project = PYPROJECT["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == {"file": "LICENSE"}
    assert project["urls"]["Repository"].startswith("https://github.com/")


def test_license_is_gpl_3():
    title, version = [line.strip() for line in (ROOT / "LICENSE").read_text().splitlines()[:2]]
    assert (title, version) == ("GNU GENERAL PUBLIC LICENSE", "Version 3, 29 June 2007")


def test_publish_workflow_runs_the_registry_action_from_the_repository_owner_only():
    job, = yaml.safe_load(PUBLISH.read_text())["jobs"].values()
    uses = [step.get("uses") for step in job["steps"]]
    assert uses == ["actions/checkout@v4", "Comfy-Org/publish-node-action@v1"]
    assert job["steps"][1]["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    owner = PYPROJECT["project"]["urls"]["Repository"].split("/")[3]
    assert f"github.repository_owner == '{owner}'" in job["if"]
