import math

import pytest
import torch

from unipic_core.models.conditioner import MetaQueryConditioner

OFFICIAL = dict(connector_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=24,
                                      num_attention_heads=24, _attn_implementation="flash_attention_2"),
                num_queries=256, llm_hidden_size=3584, pooled_projection_dim=2048, joint_attention_dim=4096)


def test_full_size_conditioner_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        conditioner = MetaQueryConditioner(**OFFICIAL)
        tokens, pooled = conditioner(torch.zeros(2, 256, 3584))
    weights = conditioner.state_dict()
    assert weights["meta_queries"].shape == (256, 3584)
    assert weights["projector_1.weight"].shape == (1536, 3584)
    assert weights["projector_2.weight"].shape == (2048, 1536)
    assert weights["projector_3.weight"].shape == (4096, 1536)
    layer = {k.split("layers.23.")[1] for k in weights if k.startswith("connector.layers.23.")}
    assert layer == {f"{m}.{p}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
                     for p in ("weight", "bias")}
    assert weights["connector.layers.0.mlp.fc1.weight"].shape == (8960, 1536)
    assert "connector.layers.24.mlp.fc1.weight" not in weights
    assert tokens.shape == (2, 256, 4096) and pooled.shape == (2, 2048)


def _reference_forward(c: MetaQueryConditioner, x: torch.Tensor):
    """The connector written out: pre-LN blocks, bidirectional softmax attention, gelu-tanh MLP, eps 1e-6."""
    x = x @ c.projector_1.weight.T + c.projector_1.bias
    heads = c.config.connector_config["num_attention_heads"]
    for layer in c.connector.layers:
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-6)
        a = layer.self_attn
        q, k, v = ((h @ p.weight.T + p.bias).unflatten(-1, (heads, -1)).transpose(1, 2)
                   for p in (a.q_proj, a.k_proj, a.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        x = x + ((weights @ v).transpose(1, 2).flatten(2) @ a.out_proj.weight.T + a.out_proj.bias)
        h = torch.nn.functional.layer_norm(x, x.shape[-1:], layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-6)
        h = torch.nn.functional.gelu(h @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias, approximate="tanh")
        x = x + (h @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias)
    tokens = x @ c.projector_3.weight.T + c.projector_3.bias
    pooled = x.mean(dim=1) @ c.projector_2.weight.T + c.projector_2.bias
    return tokens, pooled


def test_conditioner_is_the_official_recipe():
    torch.manual_seed(0)
    conditioner = MetaQueryConditioner(connector_config=dict(hidden_size=16, intermediate_size=24,
                                                             num_hidden_layers=2, num_attention_heads=2),
                                       num_queries=8, llm_hidden_size=12, pooled_projection_dim=10,
                                       joint_attention_dim=20).eval()
    for p in conditioner.parameters():  # LayerNorms start at identity; make every weight count
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 8, 12)
    with torch.no_grad():
        tokens, pooled = conditioner(x)
        expected_tokens, expected_pooled = _reference_forward(conditioner, x)
    assert torch.allclose(tokens, expected_tokens, atol=1e-5)
    assert torch.allclose(pooled, expected_pooled, atol=1e-5)  # pooled = projection of the token mean


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("connector.layers.1.mlp.fc2.bias"), "missing keys: connector.layers.1.mlp.fc2.bias"),
    (lambda sd: sd.__setitem__("connector.post_layernorm.weight", torch.ones(16)),
     "unexpected keys: connector.post_layernorm.weight"),
])
def test_conditioner_loads_strictly_and_names_a_wrong_key(tmp_path, change, words):
    from safetensors.torch import load_file, save_file

    from unipic_core.models.loading import CheckpointError, load_pretrained
    from unipic_core.tiny import SIZES, write_conditioner

    write_conditioner(tmp_path / "conditioner", SIZES["tiny"])
    path = tmp_path / "conditioner" / "diffusion_pytorch_model.safetensors"
    good = load_pretrained(MetaQueryConditioner, tmp_path / "conditioner", torch.float32)
    assert good.state_dict().keys() == load_file(path).keys()
    weights = load_file(path)
    change(weights)
    save_file(weights, path)
    with pytest.raises(CheckpointError, match=words):
        load_pretrained(MetaQueryConditioner, tmp_path / "conditioner", torch.float32)
