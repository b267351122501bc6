"""Random weights written from meta-device models: sharded as published, loaded strictly by the pack's loaders, and
the full-size MetaQuery folder at the published sizes (counted, not written)."""

import math

import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights


def test_meta_models_written_in_shards_load_strictly(tmp_path, monkeypatch):
    from unipic_core import random_weights
    from unipic_core.models.kontext_transformer import KontextSD3Transformer
    from unipic_core.models.loading import load_metaquery_encoder, load_pretrained
    from unipic_core.models.qwen25vl import published_key
    from unipic_core.models.repos import KONTEXT_TRANSFORMER_CLASS
    from unipic_core.tiny import save_with_official_class, write_metaquery_folder

    monkeypatch.setattr(random_weights, "SHARD_BYTES", 2**20)  # a few MiB each: several shards and an index
    folder = write_metaquery_folder(tmp_path / "mq")
    qwen, transformer = folder / "Qwen2.5-VL-tiny", folder / "transformer"
    (qwen / "model.safetensors").unlink()
    with no_init_weights(), torch.device("meta"):
        mllm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(qwen))
        dit = KontextSD3Transformer.from_config(KontextSD3Transformer.load_config(transformer))
    random_weights.write_random_weights(mllm, qwen, "model", rename=published_key)
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    save_with_official_class(dit, transformer, KONTEXT_TRANSFORMER_CLASS)

    assert len(list(qwen.glob("model-*-of-*.safetensors"))) > 1
    assert len(list(transformer.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    weight = load_metaquery_encoder(folder, dtype=torch.bfloat16).mllm.model.language_model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16 and abs(weight.float().std().item() - 0.02) < 2e-3
    assert load_pretrained(KontextSD3Transformer, transformer, torch.bfloat16).dtype == torch.bfloat16


def test_full_size_metaquery_folder_has_the_published_sizes(tmp_path, monkeypatch):
    from unipic_core import tiny, tiny_qwen

    counted = {}

    def count(model, folder, stem, rename=lambda key: key, **_):
        counted[folder.name] = sum(math.prod(t.shape) for t in model.state_dict().values())
        folder.mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(tiny, "write_random_weights", count)
    monkeypatch.setattr(tiny_qwen, "write_random_weights", count)
    folder = tiny.write_full_size_metaquery_folder(tmp_path / "full")

    assert round(counted["Qwen2.5-VL-7B-Instruct"] / 1e9, 2) == 8.29  # Qwen2.5-VL-7B-Instruct, vision tower included
    pos_embed = 384 * 384 * 1536  # the DiT's file also holds its position table
    assert round((counted["transformer"] - pos_embed) / 1e9, 2) == 2.24  # SD3.5-Medium's MMDiT
    config = Qwen2_5_VLForConditionalGeneration.config_class.from_pretrained(folder / "Qwen2.5-VL-7B-Instruct")
    assert (config.text_config.hidden_size, config.vision_config.depth, config.text_config.vocab_size) == (
        3584, 32, 152064)
