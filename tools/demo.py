"""The demo: a real ComfyUI, headless on 127.0.0.1, runs workflows/unipic2_kontext_edit.json and says where
the edited image is.

    python -m tools.demo [--workflow workflows/unipic2_kontext_t2i.json] [--steps N]   # from the repository root

Real weights are used when the host has them (models/unipic2/UniPic2-SD3.5M-Kontext-2B, or
UniPic2-Metaquery-9B with its Qwen2.5-VL inside for the MetaQuery workflows); otherwise a tiny random-weight
checkpoint (official layout) is generated in the work folder, so the run checks the plumbing, not the pictures. The
training workflows' reward models (PickScore, OWLv2, the EditScore adapter) are treated the same way: the official
one when models/unipic2 holds it, a tiny stand-in otherwise.
"""

import argparse
import json
import shutil
from pathlib import Path

from tools.comfyui_runner import PACK_DIR, Server, output_images, output_texts, prepare_host, ui_to_api
from unipic_core import tiny
from unipic_core.models.repos import (EDITSCORE_REPO, KONTEXT_REPOS, METAQUERY_REPOS, OWLV2_REPO,
                                      PICKSCORE_PROCESSOR_REPO, PICKSCORE_REPO)
from unipic_core.tiny_rewards import write_clip_reward_folder, write_owlv2_folder

SAMPLE_IMAGE = PACK_DIR / "workflows" / "unipic2_sample.png"
# (node, input) -> (the official choice, the tiny folder standing in for it, what writes that folder)
MODEL_INPUTS = {
    ("LoadUniPic2Kontext", "checkpoint"): (KONTEXT_REPOS[0], "UniPic2-tiny-Kontext", tiny.write_kontext_folder),
    ("LoadUniPic2MetaQuery", "checkpoint"): (METAQUERY_REPOS[0], "UniPic2-tiny-MetaQuery", tiny.write_metaquery_folder),
    ("UniPic2PickScoreReward", "model"): (PICKSCORE_REPO, "PickScore-tiny", write_clip_reward_folder),
    # the tiny CLIP folder holds its processor files, as PickScore's processor repo does
    ("UniPic2PickScoreReward", "processor"): (PICKSCORE_PROCESSOR_REPO, "PickScore-tiny", write_clip_reward_folder),
    ("UniPic2ObjectReward", "detector"): (OWLV2_REPO, "OWLv2-tiny", write_owlv2_folder),
    ("UniPic2EditScoreReward", "adapter"): (EDITSCORE_REPO, "EditScore-tiny", tiny.write_tiny_editscore_adapter),
}
TINY = {key: name for key, (_, name, _) in MODEL_INPUTS.items()}


def model_choice(node: str, name: str, host_models: Path, work_models: Path) -> str:
    """The official choice when the host has it in models/unipic2, else its tiny stand-in (generated on first
    use in work_models)."""
    official, stand_in, write = MODEL_INPUTS[node, name]
    real = host_models / official.split("/")[-1]
    if real.is_dir() and any(real.iterdir()):
        return official
    if not (work_models / stand_in).exists():
        print(f"No {official} in {host_models}: generating a tiny random-weight stand-in")
        write(work_models / stand_in)
    return stand_in


def api_prompt(workflow: Path, object_info: dict, choose, steps: int | None = None) -> dict:
    """The UI-format workflow in API format, each model input of MODEL_INPUTS set to choose(node class, input)."""
    prompt = ui_to_api(json.loads(workflow.read_text()), object_info)
    for node in prompt.values():
        for (node_type, name) in MODEL_INPUTS:
            if node["class_type"] == node_type:
                node["inputs"][name] = choose(node_type, name)
        if node["class_type"] == "UniPic2Sampler" and steps:
            node["inputs"]["steps"] = steps
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", type=Path, default=PACK_DIR / "workflows" / "unipic2_kontext_edit.json")
    parser.add_argument("--work-dir", type=Path, default=PACK_DIR / ".comfyui", help="where the host is set up")
    parser.add_argument("--steps", type=int, help="override the sampler steps")
    args = parser.parse_args()

    comfy = prepare_host(args.work_dir)
    server = Server(comfy, args.work_dir)
    try:
        server.wait_ready()
        print(f"ComfyUI {comfy} serving on {server.url}")
        shutil.copy(SAMPLE_IMAGE, server.input / SAMPLE_IMAGE.name)
        choose = lambda node, name: model_choice(node, name, comfy / "models" / "unipic2", server.models / "unipic2")
        entry = server.run(api_prompt(args.workflow, server.get("/object_info"), choose, args.steps))
    finally:
        server.stop()
    for path in output_images(entry, server.output):
        print(f"Image written: {path}")
    for text in output_texts(entry):
        print(f"Answer: {text}")


if __name__ == "__main__":
    main()
