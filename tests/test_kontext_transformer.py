import torch
from diffusers import SD3Transformer2DModel

from unipic_core.models.kontext_transformer import KontextSD3Transformer, unpatchify


def _inputs(transformer, batch=2, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, side, side, generator=g),
        encoder_hidden_states=torch.randn(batch, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([900.0, 250.0][:batch]),
    )


def test_kontext_without_reference_matches_sd3(tiny_kontext):
    ours = tiny_kontext.transformer
    reference = SD3Transformer2DModel.from_config(ours.config).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)
    inputs = _inputs(ours)
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        got = ours(**inputs, return_dict=False)[0]
    assert got.shape == inputs["hidden_states"].shape
    assert (got - expected).abs().max().item() <= 1e-5


def _prepend_and_slice(model, x, ref, context, pooled, timestep):
    """Independent statement of the Kontext rule, from the blocks up: [ref tokens, target tokens], keep the tail."""
    target = model.pos_embed(x)
    tokens = torch.cat([model.pos_embed(ref), target], dim=1)
    temb = model.time_text_embed(timestep, pooled)
    context = model.context_embedder(context)
    for block in model.transformer_blocks:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    kept = tokens[:, tokens.shape[1] - target.shape[1]:]
    out = model.proj_out(model.norm_out(kept, temb))
    b, _, h, w = x.shape
    p, c = model.config.patch_size, model.out_channels
    # unpatchify written out with explicit loops over the patch grid
    image = torch.zeros(b, c, h, w)
    for i in range(h // p):
        for j in range(w // p):
            patch = out[:, i * (w // p) + j].reshape(b, p, p, c)
            image[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = patch.permute(0, 3, 1, 2)
    return image


def test_kontext_with_reference_is_prepend_and_slice(tiny_kontext):
    model = tiny_kontext.transformer
    inputs = _inputs(model, side=6)
    ref = torch.randn_like(inputs["hidden_states"])
    with torch.no_grad():
        got = model(**inputs, ref_hidden_states=ref, return_dict=False)[0]
        expected = _prepend_and_slice(model, inputs["hidden_states"], ref, inputs["encoder_hidden_states"],
                                      inputs["pooled_projections"], inputs["timestep"])
        without = model(**inputs, return_dict=False)[0]
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - without).abs().max().item() > 1e-3  # the reference really changes the prediction


def test_reference_of_another_size_is_rejected(tiny_kontext):
    inputs = _inputs(tiny_kontext.transformer)
    ref = torch.randn(2, 16, 4, 8)
    try:
        tiny_kontext.transformer(**inputs, ref_hidden_states=ref)
    except ValueError as err:
        assert "reference latent" in str(err) and "resize" in str(err)
    else:
        raise AssertionError("a mismatched reference latent must be rejected")


def test_unpatchify_inverts_patch_layout():
    tokens = torch.arange(2 * 6 * 4 * 3, dtype=torch.float32).reshape(2, 6, 12)
    image = unpatchify(tokens, 2, 3, 2, 3)
    assert image.shape == (2, 3, 4, 6)
    assert image[0, 1, 0, 0] == tokens[0, 0, 1]  # channel is the fastest-varying axis of a token
    assert image[0, 0, 1, 3] == tokens[0, 1, (1 * 2 + 1) * 3]


def test_official_class_name_loads_as_kontext(tiny_kontext_dir):
    import json

    config = json.loads((tiny_kontext_dir / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DKontextModel"
    model = KontextSD3Transformer.from_pretrained(str(tiny_kontext_dir / "transformer"))
    assert isinstance(model, SD3Transformer2DModel)
