"""Every workflow in workflows/ on a real ComfyUI server on 127.0.0.1, converted from UI format via /object_info."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_runner import PACK_DIR, Server, output_images, prepare_host, ui_to_api
from demo import SAMPLE_IMAGE, TINY, api_prompt

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
EXPECTED_SIZES = {"unipic2_kontext_t2i.json": (384, 512), "unipic2_kontext_edit.json": (512, 352)}
LOAD_LINE = "UniPic2: loading Kontext checkpoint"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_kontext_dir):
    work = tmp_path_factory.mktemp("server")
    server = Server(prepare_host(work), work)
    (server.models / "unipic2" / TINY).symlink_to(tiny_kontext_dir, target_is_directory=True)
    (server.input / SAMPLE_IMAGE.name).write_bytes(SAMPLE_IMAGE.read_bytes())
    server.wait_ready()
    yield server
    server.stop()


def run_workflow(server, workflow: Path, seed: int | None = None) -> list[np.ndarray]:
    prompt = api_prompt(workflow, server.get("/object_info"), TINY)
    if seed is not None:
        for node in prompt.values():
            if node["class_type"] == "UniPic2Sampler":
                node["inputs"]["seed"] = seed
    entry = server.run(prompt)
    return [np.asarray(Image.open(path)) for path in output_images(entry, server.output)]


def test_shipped_workflows_are_ui_format_with_our_nodes():
    assert {w.name for w in WORKFLOWS} >= set(EXPECTED_SIZES)
    for workflow in WORKFLOWS:
        data = json.loads(workflow.read_text())
        assert {"nodes", "links", "version"} <= data.keys(), workflow.name
        assert any(n["type"].startswith(("LoadUniPic2", "UniPic2")) for n in data["nodes"])


def test_ui_to_api_maps_links_and_skips_the_seed_control_value(server):
    workflow = json.loads((PACK_DIR / "workflows" / "unipic2_kontext_edit.json").read_text())
    prompt = ui_to_api(workflow, server.get("/object_info"))
    sampler = next(n for n in prompt.values() if n["class_type"] == "UniPic2Sampler")
    assert sampler["inputs"]["seed"] == 42 and sampler["inputs"]["steps"] == 50
    assert sampler["inputs"]["sampler"] == "euler" and sampler["inputs"]["denoise"] == 1.0
    loader_id = next(k for k, n in prompt.items() if n["class_type"] == "LoadUniPic2Kontext")
    assert sampler["inputs"]["model"] == [loader_id, 0]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda w: w.name)
def test_workflow_runs_on_a_server_and_writes_images_of_the_expected_size(server, workflow):
    images = run_workflow(server, workflow)
    assert len(images) == 1
    height, width = images[0].shape[:2]
    assert (width, height) == EXPECTED_SIZES[workflow.name]
    assert images[0].std() > 0  # not a blank frame


def test_seeds_are_reproducible_and_the_model_loads_once(server):
    edit = PACK_DIR / "workflows" / "unipic2_kontext_edit.json"
    first = run_workflow(server, edit, seed=1)[0]
    other = run_workflow(server, edit, seed=2)[0]
    again = run_workflow(server, edit, seed=1)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert server.log().count(LOAD_LINE) == 1
