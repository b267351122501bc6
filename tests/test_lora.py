"""LoRA files: round trip, diffusers' load_lora_weights at the intended scale, and clear errors."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import safe_open, save_file

from conftest import randomise_lora_b
from unipic_core.lora import (TARGET_MODULES, LoRAError, add_lora, adapter_tensors, load_into_adapter, load_lora,
                              lora_weights, remove_lora, save_lora)


def _forward(transformer):
    config = transformer.config
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                           encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=g),
                           pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                           timestep=torch.tensor([300.0, 700.0])).sample


def test_adapter_targets_both_attention_streams(fresh_transformer):
    add_lora(fresh_transformer, 4, 8, seed=0)
    names = {k.split("transformer_blocks.0.attn.")[1].rsplit(".lora_", 1)[0]
             for k in adapter_tensors(fresh_transformer) if "transformer_blocks.0.attn." in k}
    assert names == set(TARGET_MODULES)
    assert all(p.dtype == torch.float32 and p.requires_grad
               for n, p in fresh_transformer.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in fresh_transformer.named_parameters() if "lora_" not in n)


def test_file_loads_in_diffusers_at_the_trained_scale(fresh_transformer, tiny_kontext, tmp_path):
    add_lora(fresh_transformer, 4, alpha=12, seed=0)  # scale alpha / r = 3
    randomise_lora_b(fresh_transformer, 0.2)
    expected = _forward(fresh_transformer)
    path = save_lora(lora_weights(fresh_transformer, 4, 12, {"base_model": "tiny"}), tmp_path / "l.safetensors")
    remove_lora(fresh_transformer)
    base = _forward(fresh_transformer)
    assert not torch.allclose(base, expected, atol=1e-3)

    te = tiny_kontext.text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=fresh_transformer, vae=tiny_kontext.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(tiny_kontext.scheduler_config),
        text_encoder=te.clip_l, tokenizer=te.tokenizer_l, text_encoder_2=te.clip_g, tokenizer_2=te.tokenizer_g,
        text_encoder_3=te.t5, tokenizer_3=te.tokenizer_t5)
    pipe.load_lora_weights(str(path))
    assert torch.allclose(_forward(pipe.transformer), expected, atol=1e-5)


def test_file_round_trip_keeps_tensors_and_metadata(fresh_transformer, tmp_path):
    add_lora(fresh_transformer, 4, alpha=8, seed=0)
    randomise_lora_b(fresh_transformer, 0.2)
    lora = lora_weights(fresh_transformer, 4, 8, {"base_model": "tiny", "steps": 7, "rewards": ["brightness"]})
    path = save_lora(lora, tmp_path / "sub" / "l.safetensors")
    loaded = load_lora(path)
    assert loaded.tensors.keys() == lora.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], lora.tensors[k]) for k in lora.tensors)
    assert (loaded.rank, loaded.alpha, loaded.info["steps"], loaded.info["rewards"]) == (4, 8, 7, ["brightness"])
    assert all(k.startswith("transformer.") and ".lora_" in k for k in loaded.tensors)
    with safe_open(str(path), "pt") as f:
        peft_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert peft_meta["transformer.r"] == 4 and peft_meta["transformer.lora_alpha"] == 4  # scale folded into B
    # Reading it back into a live adapter with another alpha keeps the same delta W.
    raw = adapter_tensors(fresh_transformer)
    remove_lora(fresh_transformer)
    add_lora(fresh_transformer, 4, alpha=8, seed=1)
    load_into_adapter(fresh_transformer, loaded, 4, 8)
    assert all(torch.allclose(adapter_tensors(fresh_transformer)[k], raw[k]) for k in raw)


def test_remove_lora_restores_the_original_weight_keys(fresh_transformer):
    keys = set(fresh_transformer.state_dict())
    add_lora(fresh_transformer, 4, 8, seed=0)
    assert set(fresh_transformer.state_dict()) != keys
    remove_lora(fresh_transformer)
    assert set(fresh_transformer.state_dict()) == keys


def test_bad_lora_files_are_refused_clearly(fresh_transformer, tmp_path):
    add_lora(fresh_transformer, 4, 8, seed=0)
    lora = lora_weights(fresh_transformer, 4, 8, {})
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(LoRAError, match="cannot read LoRA file"):
        load_lora(tmp_path / "broken.safetensors")
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoRAError, match="no 'transformer.*lora_A"):
        load_lora(tmp_path / "other.safetensors")
    remove_lora(fresh_transformer)
    add_lora(fresh_transformer, 8, 8, seed=0)
    with pytest.raises(LoRAError, match="rank 4 but training asks for rank 8"):
        load_into_adapter(fresh_transformer, lora, 8, 8)


def test_unwritable_folder_keeps_the_previous_file(fresh_transformer, tmp_path, monkeypatch):
    add_lora(fresh_transformer, 4, 8, seed=0)
    lora = lora_weights(fresh_transformer, 4, 8, {"steps": 1})
    path = save_lora(lora, tmp_path / "l.safetensors")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unipic_core.lora.save_file", disk_full)
    with pytest.raises(LoRAError, match="No space left.*previous file there is unchanged"):
        save_lora(lora_weights(fresh_transformer, 4, 8, {"steps": 2}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]  # no temp file left behind
