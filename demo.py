"""The demo: a real ComfyUI, headless on 127.0.0.1, runs workflows/unipic2_kontext_edit.json and says where
the edited image is.

    python demo.py [--workflow workflows/unipic2_kontext_t2i.json] [--steps N]

Real weights are used when models/unipic2/UniPic2-SD3.5M-Kontext-2B exists in the host; otherwise a tiny
random-weight checkpoint (official layout) is generated, so the run checks the plumbing, not the pictures.
"""

import argparse
import json
import shutil
from pathlib import Path

from comfyui_runner import PACK_DIR, Server, output_images, prepare_host, ui_to_api

REAL = "UniPic2-SD3.5M-Kontext-2B"
TINY = "UniPic2-tiny-Kontext"
SAMPLE_IMAGE = PACK_DIR / "workflows" / "unipic2_sample.png"


def checkpoint_choice(comfy: Path) -> str:
    """The real checkpoint's repo id when it is in the host, else the (generated) tiny one."""
    models = comfy / "models" / "unipic2"
    if (models / REAL / "transformer" / "config.json").exists():
        return f"Skywork/{REAL}"
    if not (models / TINY / "transformer" / "config.json").exists():
        from unipic_core.tiny import write_kontext_folder

        print(f"No real weights in {models}/{REAL}: generating a tiny random-weight checkpoint")
        write_kontext_folder(models / TINY)
    return TINY


def prepare_prompt(workflow: Path, comfy: Path, object_info: dict, steps: int | None) -> dict:
    """The workflow in API format, pointed at the available checkpoint, with its sample image in input/."""
    shutil.copy(SAMPLE_IMAGE, comfy / "input" / SAMPLE_IMAGE.name)
    prompt = ui_to_api(json.loads(workflow.read_text()), object_info)
    checkpoint = checkpoint_choice(comfy)
    for node in prompt.values():
        if node["class_type"] == "LoadUniPic2Kontext":
            node["inputs"]["checkpoint"] = checkpoint
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
    output_dir = args.work_dir / "output"
    output_dir.mkdir(parents=True, exist_ok=True)
    server = Server(comfy, args.work_dir / "comfyui.log", output_dir)
    try:
        server.wait_ready()
        print(f"ComfyUI {comfy} serving on {server.url}")
        prompt = prepare_prompt(args.workflow, comfy, server.get("/object_info"), args.steps)
        entry = server.run(prompt)
    finally:
        server.stop()
    for path in output_images(entry, output_dir):
        print(f"Image written: {path}")


if __name__ == "__main__":
    main()
