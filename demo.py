"""The demo: a real ComfyUI, headless on 127.0.0.1, runs workflows/unipic2_kontext_edit.json and says where
the edited image is.

    python demo.py [--workflow workflows/unipic2_kontext_t2i.json] [--steps N]

Real weights are used when the host has them (models/unipic2/UniPic2-SD3.5M-Kontext-2B, or
UniPic2-Metaquery-9B with its Qwen2.5-VL inside for the MetaQuery workflows); otherwise a tiny random-weight
checkpoint (official layout) is generated in the work folder, so the run checks the plumbing, not the pictures.
"""

import argparse
import json
import shutil
from pathlib import Path

from comfyui_runner import PACK_DIR, Server, output_images, output_texts, prepare_host, ui_to_api

SAMPLE_IMAGE = PACK_DIR / "workflows" / "unipic2_sample.png"
INSIDE = "(inside the checkpoint)"
# loader node -> (official repo id, tiny folder name, tiny writer's name in unipic_core.tiny)
LOADERS = {
    "LoadUniPic2Kontext": ("Skywork/UniPic2-SD3.5M-Kontext-2B", "UniPic2-tiny-Kontext", "write_kontext_folder"),
    "LoadUniPic2MetaQuery": ("Skywork/UniPic2-Metaquery-9B", "UniPic2-tiny-MetaQuery", "write_metaquery_folder"),
}


def checkpoint_choice(loader: str, host_models: Path, work_models: Path) -> str:
    """The real checkpoint's repo id when the host has it, else the tiny one (generated on first use)."""
    repo, tiny, writer = LOADERS[loader]
    real = host_models / repo.split("/")[-1]
    if (real / "transformer" / "config.json").exists():
        return repo
    if not (work_models / tiny / "transformer" / "config.json").exists():
        from unipic_core import tiny as tiny_checkpoints

        print(f"No real weights in {real}: generating a tiny random-weight checkpoint")
        getattr(tiny_checkpoints, writer)(work_models / tiny)
    return tiny


def api_prompt(workflow: Path, object_info: dict, choose_checkpoint, steps: int | None = None) -> dict:
    """The UI-format workflow in API format, each loader pointed at choose_checkpoint(loader class)."""
    prompt = ui_to_api(json.loads(workflow.read_text()), object_info)
    for node in prompt.values():
        if node["class_type"] in LOADERS:
            node["inputs"]["checkpoint"] = choose_checkpoint(node["class_type"])
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
        choose = (lambda loader: checkpoint_choice(loader, comfy / "models" / "unipic2", server.models / "unipic2"))
        entry = server.run(api_prompt(args.workflow, server.get("/object_info"), choose, args.steps))
    finally:
        server.stop()
    for path in output_images(entry, server.output):
        print(f"Image written: {path}")
    for text in output_texts(entry):
        print(f"Answer: {text}")


if __name__ == "__main__":
    main()
