"""Save LoRA and Apply LoRA inside the real ComfyUI host: names that never replace a file, LoRAs that must fit."""

import math
import os
import re

import pytest
import torch

from test_nodes_in_host import TINY
from unipic_core.models.lora import LoRAWeights


@pytest.fixture(scope="module")
def model(host):
    return host.node("LoadUniPic2Kontext").load(TINY, "fp32")[0]


@pytest.fixture(scope="module")
def targets(host, model):
    """The model's adapted modules (diffusers names) and their (out, in) shapes."""
    return host.module("nodes.host.native_training").lora_targets(model)


def lora_for(targets, extra_in: int = 0, rank: int = 4) -> LoRAWeights:
    """A LoRA on every target module; extra_in > 0 makes A [r, in + extra_in] (another model size)."""
    tensors = {}
    for name, target in targets.items():
        out_features, in_features = target.shape
        tensors[f"transformer.{name}.lora_A.weight"] = torch.full((rank, in_features + extra_in), 0.01)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.full((out_features, rank), 0.01)
    return LoRAWeights(tensors, {"rank": rank, "alpha": rank})


def small_lora() -> LoRAWeights:
    tensors = {"transformer.a.lora_A.weight": torch.ones(2, 3), "transformer.a.lora_B.weight": torch.ones(3, 2)}
    return LoRAWeights(tensors, {"rank": 2, "alpha": 2})


def test_apply_lora_refuses_mismatched_shapes_naming_the_module(host, model, targets):
    lora = lora_for(targets, extra_in=8)
    first = lora.modules()[0]
    out_features, in_features = targets[first].shape
    with pytest.raises(ValueError, match=rf"UniPic2 Apply LoRA: module {re.escape(first)}: the LoRA's A \(4, "
                                         rf"{in_features + 8}\) and B \({out_features}, 4\) do not fit the model's "
                                         rf"weight \({out_features}, {in_features}\).*another model size"):
        host.node("UniPic2ApplyLoRA").apply(model, lora, 1.0)
    assert host.node("UniPic2ApplyLoRA").apply(model, lora_for(targets), 1.0)[0] is not model


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf])
def test_apply_lora_refuses_nan_strength(host, model, targets, strength):
    with pytest.raises(ValueError, match=rf"UniPic2 Apply LoRA: strength is {strength}; give a finite number"):
        host.node("UniPic2ApplyLoRA").apply(model, lora_for(targets), strength)


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links (FAT)"])
def test_save_lora_never_overwrites_a_file_created_meanwhile(host, monkeypatch, hard_links):
    lora_module = host.module("unipic_core.models.lora")
    folder = host.loras / f"race_{hard_links}"
    theirs = folder / "mine_00001.safetensors"
    real_save_file = lora_module.save_file

    def save_while_another_writer_takes_the_name(tensors, tmp, metadata):
        real_save_file(tensors, tmp, metadata=metadata)
        if not theirs.exists():
            theirs.write_bytes(b"theirs")

    def no_hard_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(lora_module, "save_file", save_while_another_writer_takes_the_name)
    if not hard_links:
        monkeypatch.setattr(os, "link", no_hard_links)
    lora = small_lora()
    written = host.node("UniPic2SaveLoRA").save(lora, f"race_{hard_links}/mine")["ui"]["text"][0]
    assert written.endswith("mine_00002.safetensors")
    assert theirs.read_bytes() == b"theirs"
    assert sorted(p.name for p in folder.iterdir()) == ["mine_00001.safetensors", "mine_00002.safetensors"]


@pytest.mark.parametrize("prefix, why", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("/tmp/loras/mine", "is an absolute path"),
    ("unipic2/../../mine", "has a '..' part"),
    ("unipic2/../mine", "has a '..' part"),
    ("unipic2:mine", "has :, which a file name cannot hold"),
    ("unipic2\\mine", r"has \\, which a file name cannot hold on every system \(use '/' between folders\)"),
    ("mine?\tx", r"has '\\t' \?, which a file name cannot hold"),
    ("unipic2/", "has an empty folder or file name"),
    ("unipic2//mine", "has an empty folder or file name"),
])
def test_save_lora_refuses_bad_filename_prefixes(host, prefix, why):
    lora = small_lora()
    before = sorted(host.loras.rglob("*"))
    with pytest.raises(ValueError, match=rf"UniPic2 Save LoRA: filename_prefix '{re.escape(prefix)}' {why}.*give a "
                                         "path under models/loras such as 'unipic2/reward_lora'"):
        host.node("UniPic2SaveLoRA").save(lora, prefix)
    assert sorted(host.loras.rglob("*")) == before
