"""Fault test: a training run SIGKILLed at random points of its steps resumes to the LoRA of an uninterrupted run.

The tiny model is loaded once in this process; every run is a forked child on one CPU thread (the same arithmetic
in every run, and no torch import per run), checkpointing every step, so twenty kills and resumes stay fast.
Half the kills fall anywhere in the steps; the other half just after a random step ends, within the time its two
checkpoint writes take, where a kill leaves a temp file or a state without its LoRA.
"""

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from unipic_core.models.loading import load_kontext
from unipic_core.models.lora import load_lora, save_lora
from unipic_core.rewards import colour_reward
from unipic_core.training.grpo_settings import GRPOSettings
from unipic_core.training.grpo_trainer import GRPOTrainer, Hooks
from unipic_core.training.training_data import TrainingItem
from unipic_core.training.training_models import models_on_device
from unipic_core.training.training_state import load_state, save_state

KILLS = 20
STEPS = 4
PROMPTS = [TrainingItem("a red fox"), TrainingItem("a blue lake")]
FORK = multiprocessing.get_context("fork")


def settings() -> GRPOSettings:
    return GRPOSettings(steps=STEPS, group_size=2, sampling_steps=2, resolution=64, lora_rank=4, lora_alpha=12,
                        learning_rate=1e-2, save_every=1)


@pytest.fixture(scope="module")
def models(tiny_kontext_dir):
    return models_on_device(load_kontext(tiny_kontext_dir), tiny_kontext_dir, torch.device("cpu"))


def train_in_child(models, path, trained, finished_step) -> None:
    torch.set_num_threads(1)
    trainer = GRPOTrainer(models, colour_reward((1, 1, 1)), PROMPTS, settings(), checkpoint=path, resume=True)
    trained.set()  # from here on the child is in its steps (or in the writes after them)
    try:
        trainer.run(Hooks(on_step=lambda report: setattr(finished_step, "value", report.step)))
    finally:
        trainer.close()


def start_training(models, path):
    trained, finished_step = FORK.Event(), FORK.Value("i", 0)
    child = FORK.Process(target=train_in_child, args=(models, path, trained, finished_step))
    child.start()
    assert trained.wait(120), "the training child did not start"
    return child, finished_step


def train_to_the_end(models, path) -> float:
    """Runs (or resumes) to STEPS in a child; returns the seconds its steps and checkpoints took."""
    child, _ = start_training(models, path)
    began = time.monotonic()
    child.join()
    assert child.exitcode == 0, f"training {path} failed (exit code {child.exitcode}, traceback above)"
    return time.monotonic() - began


def writes_time(reference) -> float:
    """Seconds one step's two checkpoint writes take (the reference's, written again elsewhere)."""
    state, lora = load_state(reference.with_suffix(".training-state")), load_lora(reference)
    began = time.monotonic()
    save_state(state, reference.with_name("again.training-state"))
    save_lora(lora, reference.with_name("again.safetensors"))
    return time.monotonic() - began


def kill_at_random(child, finished_step, rng: random.Random, steps_time: float, write_time: float) -> None:
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0, steps_time))  # anywhere in steps 1..STEPS
    else:
        step = rng.randint(1, STEPS)
        while finished_step.value < step and child.is_alive():
            time.sleep(0.001)
        time.sleep(rng.uniform(0, write_time))  # in that step's checkpoint writes
    os.kill(child.pid, signal.SIGKILL)
    child.join()


def test_killed_training_resumes_to_the_same_lora(models, tmp_path):
    reference = tmp_path / "reference" / "run.safetensors"
    steps_time = train_to_the_end(models, reference)
    write_time = writes_time(reference)
    expected = load_lora(reference).tensors
    killed_in = []  # the step each kill interrupted (the checkpoint's step + 1), for the failure message
    for seed in range(KILLS):
        path = tmp_path / f"kill{seed}" / "run.safetensors"
        kill_at_random(*start_training(models, path), random.Random(seed), steps_time, write_time)
        state = path.with_suffix(".training-state")
        killed_in.append(load_state(state).step + 1 if state.exists() else 1)
        train_to_the_end(models, path)
        lora = load_lora(path)
        assert lora.info["steps"] == STEPS and lora.tensors.keys() == expected.keys(), killed_in
        assert all(torch.equal(lora.tensors[k], v) for k, v in expected.items()), (seed, killed_in)
        assert not list(path.parent.glob("*.tmp-*")), (seed, sorted(p.name for p in path.parent.iterdir()))
