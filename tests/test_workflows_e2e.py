"""Every workflow in workflows/ on a real ComfyUI server on 127.0.0.1, converted from UI format via /object_info."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.comfyui_runner import PACK_DIR, output_images, output_texts, ui_to_api
from tools.demo import api_prompt, model_choice

from conftest import tiny_server

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
EXPECTED_SIZES = {"unipic2_kontext_t2i.json": (384, 512), "unipic2_kontext_edit.json": (512, 352),
                  "unipic2_kontext_edit_flow_sde.json": (512, 352),
                  "unipic2_metaquery_t2i.json": (384, 512), "unipic2_metaquery_edit.json": (512, 352)}
TEXT_WORKFLOWS = {"unipic2_understand.json"}
# GRPO workflow -> (LoRA files its trainers write, images it saves: curves and samples per trainer, + generation)
GRPO_WORKFLOWS = {"unipic2_grpo_t2i.json": (["unipic2_grpo_t2i"], 2),
                  "unipic2_grpo_edit.json": (["unipic2_grpo_edit"], 2),
                  "unipic2_grpo_pdtr.json": (["unipic2_pdtr_edit", "unipic2_pdtr_t2i"], 5)}
LORA_LINE = re.compile(r"UniPic2 GRPO Trainer: LoRA written to (\S+)")
CURVES_SIZE = (768, 512)
LOAD_LINE = "UniPic2: loading Kontext checkpoint"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_kontext_dir, tiny_metaquery_dir):
    server = tiny_server(tmp_path_factory.mktemp("server"), tiny_kontext_dir, tiny_metaquery_dir)
    server.wait_ready()
    yield server
    server.stop()


def run_workflow(server, workflow: Path, seed: int | None = None) -> dict:
    # the reward models' tiny stand-ins are generated into the server's models folder on first use
    choose = lambda node, name: model_choice(node, name, server.models / "none", server.models / "unipic2")
    prompt = api_prompt(workflow, server.get("/object_info"), choose)
    if seed is not None:
        for node in prompt.values():
            if node["class_type"] in ("UniPic2Sampler", "UniPic2Understand"):
                node["inputs"]["seed"] = seed
    return server.run(prompt)


def images_of(server, entry: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in output_images(entry, server.output)]


def test_shipped_workflows_are_ui_format_with_our_nodes():
    assert {w.name for w in WORKFLOWS} == set(EXPECTED_SIZES) | TEXT_WORKFLOWS | set(GRPO_WORKFLOWS)
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


@pytest.mark.parametrize("workflow", [w for w in WORKFLOWS if w.name not in GRPO_WORKFLOWS], ids=lambda w: w.name)
def test_workflow_runs_on_a_server_and_gives_its_output(server, workflow):
    entry = run_workflow(server, workflow)
    if workflow.name in TEXT_WORKFLOWS:
        texts = output_texts(entry)
        assert len(texts) == 1 and texts[0].strip()
        return
    images = images_of(server, entry)
    assert len(images) == 1
    height, width = images[0].shape[:2]
    assert (width, height) == EXPECTED_SIZES[workflow.name]
    assert images[0].std() > 0  # not a blank frame


def test_seeds_are_reproducible_and_the_model_loads_once(server):
    edit = PACK_DIR / "workflows" / "unipic2_kontext_edit.json"
    first = images_of(server, run_workflow(server, edit, seed=1))[0]
    loads = server.log().count(LOAD_LINE)  # earlier tests may have loaded another checkpoint in between
    other, again = (images_of(server, run_workflow(server, edit, seed=s))[0] for s in (2, 1))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert loads >= 1 and server.log().count(LOAD_LINE) == loads  # executing again did not reload


def test_understand_workflow_is_deterministic_per_seed(server):
    understand = PACK_DIR / "workflows" / "unipic2_understand.json"
    answers = [output_texts(run_workflow(server, understand, seed=s))[0] for s in (5, 6, 5)]
    assert answers[0] == answers[2]


@pytest.mark.parametrize("name", sorted(GRPO_WORKFLOWS))
def test_grpo_workflow_trains_and_writes_its_lora_and_curves(server, name):
    from unipic_core.models.lora import load_lora

    loras, image_count = GRPO_WORKFLOWS[name]
    entry = run_workflow(server, PACK_DIR / "workflows" / name)
    images = images_of(server, entry)
    assert len(images) == image_count
    curves = [image for image in images if (image.shape[1], image.shape[0]) == CURVES_SIZE]
    assert len(curves) == len(loras) and all(c.std() > 0 for c in curves)
    written = {Path(p).stem: Path(p) for p in LORA_LINE.findall(server.log())}
    for lora in loras:
        assert load_lora(written[lora]).info["steps"] == 10
    if name == "unipic2_grpo_pdtr.json":  # the text-to-image stage continued the edit stage's LoRA
        second = load_lora(written["unipic2_pdtr_t2i"])
        assert second.info["rewards"] == ["pickscore", "objects"]
