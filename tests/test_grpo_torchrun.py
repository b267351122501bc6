"""torchrun data parallelism: two CPU processes (gloo) make the same LoRA update as one with the same batch."""

import os
import subprocess
import sys

import torch

from conftest import ROOT
from unipic_core.models.lora import load_lora

SETTINGS = ["--steps", "2", "--group-size", "4", "--sampling-steps", "3", "--resolution", "64", "--lora-rank", "4",
            "--lora-alpha", "8", "--learning-rate", "0.01", "--reward", "brightness", "--dtype", "fp32"]


def run(launcher: list[str], checkpoint, prompts, output):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = launcher + ["-m", "unipic_core.training.grpo_torchrun", "--checkpoint", str(checkpoint), "--prompts",
                          str(prompts), "--output", str(output), *SETTINGS]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_two_processes_equal_one(tiny_kontext_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue lake\n")
    single = run([sys.executable], tiny_kontext_dir, prompts, tmp_path / "one.safetensors")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    double = run(torchrun, tiny_kontext_dir, prompts, tmp_path / "two.safetensors")
    assert single.count("step ") == double.count("step ") == 2  # rank 0 alone reports
    one, two = load_lora(tmp_path / "one.safetensors"), load_lora(tmp_path / "two.safetensors")
    assert one.tensors.keys() == two.tensors.keys()
    moved = max((v.abs().max().item() for k, v in one.tensors.items() if "lora_B" in k))
    assert moved > 1e-3  # the update is real, so equality below means something
    for key, value in one.tensors.items():
        assert torch.allclose(two.tensors[key], value, atol=1e-5, rtol=1e-4), key
