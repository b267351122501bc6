"""The demo: a real ComfyUI, headless on 127.0.0.1, runs workflows/unipic2_kontext_edit.json and says where
the edited image is.

    python demo.py [--workflow workflows/unipic2_kontext_t2i.json] [--steps N]

Real weights are used when the host has models/unipic2/UniPic2-SD3.5M-Kontext-2B; otherwise a tiny random-weight
checkpoint (official layout) is generated in the work folder, so the run checks the plumbing, not the pictures.
"""

import argparse
import json
import shutil
from pathlib import Path

from comfyui_runner import PACK_DIR, Server, output_images, prepare_host, ui_to_api

REAL = "UniPic2-SD3.5M-Kontext-2B"
TINY = "UniPic2-tiny-Kontext"
SAMPLE_IMAGE = PACK_DIR / "workflows" / "unipic2_sample.png"


def checkpoint_choice(host_models: Path, work_models: Path) -> str:
    """The real checkpoint's repo id when the host has it, else the tiny one (generated on first use)."""
    if (host_models / REAL / "transformer" / "config.json").exists():
        return f"Skywork/{REAL}"
    if not (work_models / TINY / "transformer" / "config.json").exists():
        from unipic_core.tiny import write_kontext_folder

        print(f"No real weights in {host_models / REAL}: generating a tiny random-weight checkpoint")
        write_kontext_folder(work_models / TINY)
    return TINY


def api_prompt(workflow: Path, object_info: dict, checkpoint: str, steps: int | None = None) -> dict:
    """The UI-format workflow in API format, its loader pointed at `checkpoint`."""
    prompt = ui_to_api(json.loads(workflow.read_text()), object_info)
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
    server = Server(comfy, args.work_dir)
    try:
        server.wait_ready()
        print(f"ComfyUI {comfy} serving on {server.url}")
        shutil.copy(SAMPLE_IMAGE, server.input / SAMPLE_IMAGE.name)
        checkpoint = checkpoint_choice(comfy / "models" / "unipic2", server.models / "unipic2")
        entry = server.run(api_prompt(args.workflow, server.get("/object_info"), checkpoint, args.steps))
    finally:
        server.stop()
    for path in output_images(entry, server.output):
        print(f"Image written: {path}")


if __name__ == "__main__":
    main()
