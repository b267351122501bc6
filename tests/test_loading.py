import shutil

import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file

from unipic_core.models.kontext_transformer import KontextSD3Transformer
from unipic_core.models.loading import CheckpointError, load_kontext
from unipic_core.tiny import SD35M_TRANSFORMER

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def kontext_copy(tiny_kontext_dir, tmp_path):
    return shutil.copytree(tiny_kontext_dir, tmp_path / "copy")


def test_full_size_kontext_has_the_official_sd35m_keys():
    with torch.device("meta"):
        ours = KontextSD3Transformer(**SD35M_TRANSFORMER).state_dict()
        sd3 = SD3Transformer2DModel(**SD35M_TRANSFORMER).state_dict()
    assert ours.keys() == sd3.keys()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in sd3.items()}
    # spot checks against the released checkpoint's layout
    assert ours["pos_embed.pos_embed"].shape == (1, 384 * 384, 1536)
    assert "transformer_blocks.12.attn2.to_q.weight" in ours and "transformer_blocks.13.attn2.to_q.weight" not in ours
    assert ours["context_embedder.weight"].shape == (1536, 4096)
    assert sum(v.numel() for v in ours.values()) > 2.0e9


def test_official_layout_state_dict_loads_strictly(kontext_copy):
    weights = load_file(kontext_copy / WEIGHTS)
    model = load_kontext(kontext_copy).transformer
    loaded = model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("proj_out.bias"), "missing keys: proj_out.bias"),
    (lambda sd: sd.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(2)),
     "unexpected keys: transformer_blocks.0.extra.weight"),
])
def test_key_mismatch_names_the_key(kontext_copy, change, words):
    weights = load_file(kontext_copy / WEIGHTS)
    change(weights)
    save_file(weights, kontext_copy / WEIGHTS)
    with pytest.raises(CheckpointError, match=words):
        load_kontext(kontext_copy)


def test_wrongly_shaped_weight_is_reported(kontext_copy):
    weights = load_file(kontext_copy / WEIGHTS)
    weights["proj_out.bias"] = torch.zeros(3)
    save_file(weights, kontext_copy / WEIGHTS)
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        load_kontext(kontext_copy)


def test_truncated_safetensors_is_named(kontext_copy):
    path = kontext_copy / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors is corrupt or truncated"):
        load_kontext(kontext_copy)


def test_garbage_safetensors_is_named(kontext_copy):
    (kontext_copy / "text_encoder" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="text_encoder/model.safetensors is corrupt"):
        load_kontext(kontext_copy)


def test_folder_without_transformer_config_says_what_is_expected(kontext_copy):
    (kontext_copy / "transformer" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"'transformer/config.json' not found .* expected a diffusers folder"):
        load_kontext(kontext_copy)


def test_dtype_is_applied_to_every_component(tiny_kontext_dir):
    components = load_kontext(tiny_kontext_dir, torch.bfloat16)
    modules = [components.transformer, components.vae, *components.text_encoders.modules()]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.bfloat16}


def test_offline_download_gives_a_clear_error(tmp_path, monkeypatch):
    from unipic_core.models.loading import download_repo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not download Skywork/UniPic2-SD3.5M-Kontext-2B .* copy the folder"):
        download_repo("Skywork/UniPic2-SD3.5M-Kontext-2B", tmp_path / "UniPic2-SD3.5M-Kontext-2B")
