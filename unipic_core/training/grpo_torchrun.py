"""GRPO-LoRA training outside ComfyUI, on one GPU or many (data-parallel under torchrun).

    torchrun --nproc_per_node 8 -m unipic_core.training.grpo_torchrun \
        --checkpoint models/unipic2/UniPic2-SD3.5M-Kontext-2B \
        --prompts prompts.txt --reward jpeg-compressibility --output my_lora.safetensors --group-size 16

--reward takes one or more NAME or NAME=WEIGHT (summed with those weights): the rule-based brightness,
jpeg-compressibility, jpeg-incompressibility, edit-consistency, or the learned pickscore, clipscore, aesthetic,
objects (GenEval-style prompt lines) and editscore (edit pairs on a MetaQuery checkpoint, whose MLLM it uses), whose
models are read from --reward-models (default models/unipic2 in the current folder: ComfyUI's when run from its
root) and downloaded there first when absent.

Each process takes a contiguous slice of the K * G images of a step; rewards are gathered for the advantages and
LoRA gradients summed (gloo on CPU, nccl on GPUs), so the update equals a single process's with the same global
batch. Only rank 0 writes the LoRA and its resumable .training-state. Without torchrun it runs as one process.
"""

import argparse
import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..models.folders import is_metaquery_folder
from ..models.loading import load_kontext, load_metaquery
from .grpo_settings import GRPOSettings
from .grpo_trainer import GRPOTrainer, Hooks
from .torchrun_rewards import build_reward, check_choices, fetch_models, reward_choice
from .training_data import edit_pairs, read_folder_images, read_prompts, read_text_lines
from .training_models import models_on_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DOWNLOAD_TIMEOUT = timedelta(hours=3)  # how long the other ranks wait for rank 0's reward-model downloads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="UniPic2 Kontext or MetaQuery folder (diffusers layout)")
    parser.add_argument("--mllm", default=None, help="Qwen2.5-VL folder for MetaQuery (default: inside checkpoint)")
    parser.add_argument("--prompts", default="", help="text file, one prompt per line (text-to-image)")
    parser.add_argument("--edit-images", default="", help="folder of source images (editing)")
    parser.add_argument("--edit-instructions", default="", help="text file, one instruction per source image")
    parser.add_argument("--reward", type=reward_choice, nargs="+", required=True,
                        help="NAME or NAME=WEIGHT, one or more (see above)")
    parser.add_argument("--reward-models", type=Path, default=Path("models/unipic2"),
                        help="folder of the learned rewards' models, e.g. ComfyUI/models/unipic2 (missing ones are "
                        "downloaded into it)")
    parser.add_argument("--output", required=True, help="LoRA .safetensors to write (state saved next to it)")
    parser.add_argument("--resume", action="store_true", help="continue from --output's .training-state")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    for field in dataclasses.fields(GRPOSettings):
        kind = field.type
        flag = "--" + field.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=field.default)
        else:
            parser.add_argument(flag, type=kind, default=field.default)
    return parser.parse_args(argv)


def training_data(args):
    if args.prompts:
        return read_prompts("", args.prompts)
    if not (args.edit_images and args.edit_instructions):
        raise SystemExit("give --prompts, or --edit-images with --edit-instructions")
    instructions = read_text_lines(args.edit_instructions, "instruction file")
    return edit_pairs(read_folder_images(args.edit_images), instructions)


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if distributed else 0
    dtype = DTYPES[args.dtype] if cuda else torch.float32
    settings = GRPOSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOSettings)})
    data = training_data(args)
    folder = Path(args.checkpoint)
    metaquery = is_metaquery_folder(folder)
    names = [name for name, _ in args.reward]
    check_choices(names, metaquery)
    if rank == 0:  # before the (long) checkpoint load, so a failed download costs nothing
        fetch_models(names, args.reward_models)
    if distributed:  # the other ranks load what rank 0 downloaded; NCCL's 10-minute timeout may be too short
        dist.barrier(group=dist.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT))
    components = load_metaquery(folder, args.mllm, dtype) if metaquery else load_kontext(folder, dtype)
    models = models_on_device(components, folder, device, settings.negative_prompt)

    def report(step):
        if rank == 0:
            total = step.rewards["total"]
            print(f"step {step.step}/{step.total_steps} reward {total[0]:.4f} ± {total[1]:.4f} "
                  f"loss {step.loss:.4g} kl {step.kl:.4g} {step.elapsed:.1f}s", flush=True)

    reward = build_reward(args.reward, args.reward_models, device, components.mllm if metaquery else None)
    trainer = GRPOTrainer(models, reward, data, settings, Path(args.output), args.resume)
    try:
        trainer.run(Hooks(on_step=report))
    finally:
        trainer.close()
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
