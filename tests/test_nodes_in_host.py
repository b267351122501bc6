"""The pack's nodes inside the real ComfyUI host, in this process (docs/architecture.md §8)."""

import logging

import pytest
import torch

from conftest import TINY_KONTEXT as TINY


def t2i_prompt(steps=3, batch=2, seed=5, width=64, height=96):
    return {
        "1": {"class_type": "LoadUniPic2Kontext", "inputs": {"checkpoint": TINY, "dtype": "fp32"}},
        "2": {"class_type": "UniPic2TextEncode", "inputs": {"text_encoders": ["1", 1], "prompt": "a red fox",
                                                             "negative_prompt": "blurry"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "4": {"class_type": "UniPic2Sampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["3", 0], "seed": seed,
            "steps": steps, "guidance": 3.5, "sampler": "euler", "noise_level": 0.7, "shift": 0.0, "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"vae": ["1", 2], "samples": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "t2i"}},
    }


@pytest.fixture
def progress_hook(monkeypatch):
    import comfy.cli_args
    import comfy.utils

    monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.Auto)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **_: calls.append((value, total, preview)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(None)


def test_every_node_has_a_category_a_description_and_tooltips(host):
    mappings = host.pack.NODE_CLASS_MAPPINGS
    assert set(mappings) <= set(host.nodes.NODE_CLASS_MAPPINGS)
    assert set(mappings) == set(host.pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in mappings.items():
        assert cls.CATEGORY.startswith("UniPic2/"), name
        assert getattr(cls, "DESCRIPTION", "").strip(), f"{name} has no DESCRIPTION"
        inputs = cls.INPUT_TYPES()
        for input_name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_loader_lists_local_folders_and_official_repos(host):
    choices = host.nodes.NODE_CLASS_MAPPINGS["LoadUniPic2Kontext"].INPUT_TYPES()["required"]["checkpoint"][0]
    assert TINY in choices
    assert "Skywork/UniPic2-SD3.5M-Kontext-2B" in choices and "Skywork/UniPic2-SD3.5M-Kontext-GRPO-2B" in choices


def test_loading_twice_reuses_the_cached_components(host, loaded):
    again = host.node("LoadUniPic2Kontext").load(TINY, "fp32")
    assert all(a is b for a, b in zip(again, loaded))
    assert loaded[0].model_size() > 0  # ComfyUI plans memory with the true size
    assert len(loaded[1].patchers) == 3


def test_text_to_image_prompt_runs_with_progress_and_previews(host, progress_hook):
    success, messages = host.execute(t2i_prompt(steps=3, batch=2))
    assert success, messages
    executed = [data for event, data in messages if event == "executed" and data["node"] == "6"]
    files = [host.output / f["filename"] for f in executed[0]["output"]["images"]]
    assert len(files) == 2
    import numpy as np
    from PIL import Image

    first, second = (torch.from_numpy(np.array(Image.open(f))) for f in files)
    assert Image.open(files[0]).size == (64, 96)
    assert not torch.equal(first, second)  # a batch gets different noise per image
    sampler_steps = [(v, t, p) for v, t, p in progress_hook if t == 3]
    assert [v for v, _, _ in sampler_steps] == [1, 2, 3]
    fmt, image, max_size = sampler_steps[-1][2]
    assert fmt == "JPEG" and image.size == (8, 12) and max_size == 512


def test_cancel_stops_within_one_step_and_writes_no_file(host, progress_hook):
    import comfy.model_management as mm
    import comfy.utils

    steps_seen = []

    def press_cancel_after_step_two(value, total, preview, **_):  # the host passes node_id too
        steps_seen.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(press_cancel_after_step_two)
    before = set(host.output.rglob("*"))
    prompt = t2i_prompt(steps=20, seed=99)
    prompt["6"]["inputs"]["filename_prefix"] = "cancelled"
    try:
        success, messages = host.execute(prompt)
    finally:
        mm.interrupt_current_processing(False)
    assert not success
    assert "execution_interrupted" in [event for event, _ in messages]
    assert max(steps_seen) == 2  # the step running when Cancel was pressed finished, no further one
    assert set(host.output.rglob("*")) == before


def test_native_reference_latent_format_equals_edit_reference(host, loaded, conditioning):
    model, _, vae = loaded
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    pos, neg, latent = host.node("UniPic2EditReference").attach(vae, image, *conditioning, "keep size", 512, 32)
    # what native ReferenceLatent does: append the (raw) latent from VAE Encode under "reference_latents"
    raw = host.node("VAEEncode").encode(vae, image)[0]["samples"]
    native = [[[t, {**d, "reference_latents": [raw]}] for t, d in c] for c in conditioning]
    sampler = host.node("UniPic2Sampler")
    args = dict(seed=3, steps=2, guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)
    ours = sampler.sample(model, pos, neg, latent, **args)[0]["samples"]
    theirs = sampler.sample(model, *native, latent, **args)[0]["samples"]
    text_only = sampler.sample(model, *conditioning, latent, **args)[0]["samples"]
    assert ours.shape == (1, 16, 12, 16)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, text_only)


def test_same_seed_same_latent_other_seed_different(host, loaded, conditioning):
    model = loaded[0]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    sampler = host.node("UniPic2Sampler")
    args = dict(steps=3, guidance=2.0, sampler="flow-sde", noise_level=0.7, shift=0.0, denoise=1.0)
    a, b, c = (sampler.sample(model, *conditioning, latent, seed=s, **args)[0]["samples"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_denoise_below_one_starts_from_the_input_latent(host, loaded, conditioning):
    model = loaded[0]
    sampler = host.node("UniPic2Sampler")
    args = dict(seed=0, steps=4, guidance=1.0, sampler="euler", noise_level=0.7, shift=0.0)
    start_a, start_b = torch.zeros(1, 16, 8, 8), torch.full((1, 16, 8, 8), 2.0)
    low_a, low_b = (sampler.sample(model, *conditioning, {"samples": s}, denoise=0.3, **args)[0]["samples"]
                    for s in (start_a, start_b))
    full_a, full_b = (sampler.sample(model, *conditioning, {"samples": s}, denoise=1.0, **args)[0]["samples"]
                      for s in (start_a, start_b))
    assert torch.equal(full_a, full_b)  # full denoise ignores the input content
    assert (low_b - low_a).abs().mean() > 0.5  # low denoise keeps it


# --- bad input: each names the input and the fix -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 32, 128, 3), (1, 0, 0, 3), (0, 96, 96, 3)])
def test_too_small_or_empty_reference_image_is_rejected(host, loaded, conditioning, shape):
    with pytest.raises(ValueError, match=r"'image'.*at least 64 px"):
        host.node("UniPic2EditReference").attach(loaded[2], torch.rand(shape), *conditioning, "longer edge", 512, 32)


def test_reference_image_off_the_grid_is_resized_and_reported(host, loaded, conditioning, caplog):
    image = torch.rand(1, 100, 150, 3)
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        pos, _, latent = host.node("UniPic2EditReference").attach(loaded[2], image, *conditioning,
                                                                   "longer edge", 256, 32)
    assert latent["samples"].shape == (1, 16, 160 // 8, 256 // 8)
    assert pos[0][1]["reference_latents"][0].shape == latent["samples"].shape
    assert "resized from 150x100 to 256x160" in caplog.text


def test_latent_off_the_patch_grid_is_resized_and_reported(host, loaded, conditioning, caplog):
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        out = host.node("UniPic2Sampler").sample(loaded[0], *conditioning, {"samples": torch.zeros(1, 16, 9, 13)},
                                                 seed=0, steps=1, guidance=1.0, sampler="euler", noise_level=0.7,
                                                 shift=0.0, denoise=1.0)[0]["samples"]
    assert out.shape == (1, 16, 8, 12)
    assert "latent 13x9 resized to 12x8" in caplog.text


def test_nan_in_the_latent_is_named(host, loaded, conditioning):
    latent = torch.zeros(1, 16, 8, 8)
    latent[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'latent' contains NaN"):
        host.node("UniPic2Sampler").sample(loaded[0], *conditioning, {"samples": latent}, seed=0, steps=1,
                                           guidance=1.0, sampler="euler", noise_level=0.7, shift=0.0, denoise=0.5)


def test_conditioning_of_another_model_is_named(host, loaded):
    foreign = [[torch.zeros(1, 154, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    with pytest.raises(ValueError, match="'positive' has width 4096 .* same checkpoint"):
        host.node("UniPic2Sampler").sample(loaded[0], foreign, foreign, {"samples": torch.zeros(1, 16, 8, 8)},
                                           seed=0, steps=1, guidance=1.0, sampler="euler", noise_level=0.7,
                                           shift=0.0, denoise=1.0)


def test_two_references_are_refused_with_a_fix(host, loaded, conditioning):
    raw = torch.zeros(1, 16, 8, 8)
    twice = [[[t, {**d, "reference_latents": [raw, raw]}] for t, d in c] for c in conditioning]
    with pytest.raises(ValueError, match="2 reference latents .* remove the extra"):
        host.node("UniPic2Sampler").sample(loaded[0], *twice, {"samples": raw}, seed=0, steps=1, guidance=1.0,
                                           sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)


def test_missing_checkpoint_choice_says_where_to_put_it(host):
    with pytest.raises(ValueError, match="checkpoint 'nope' not found; put it in"):
        host.node("LoadUniPic2Kontext").load("nope", "fp32")


def test_hub_download_progress_reaches_comfyuis_progress_bar(host, progress_hook, monkeypatch, tmp_path):
    import huggingface_hub

    def fake_snapshot_download(repo_id, local_dir, tqdm_class):  # three files, as the hub client reports them
        bar = tqdm_class(total=3, desc=f"Fetching {repo_id}")
        for _ in range(3):
            bar.update(1)
        bar.close()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loading = host.module("unipic_core.models.loading")
    loading.download_repo("Skywork/UniPic2-SD3.5M-Kontext-2B", tmp_path / "x", host.module("nodes.host.progress").download_progress())
    assert [(value, total) for value, total, _ in progress_hook] == [(1, 3), (2, 3), (3, 3)]


# --- native conditioning features: ComfyUI's sampling honours noise masks, timestep ranges, areas and masks ----

SAMPLER_ARGS = dict(seed=3, steps=4, guidance=3.0, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)


def _sample(host, model, positive, negative, latent, **overrides):
    return host.node("UniPic2Sampler").sample(model, positive, negative, latent,
                                              **{**SAMPLER_ARGS, **overrides})[0]["samples"]


@pytest.mark.parametrize("sampler", ["euler", "flow-sde"])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_set_latent_noise_mask_regenerates_only_the_masked_region(host, loaded, conditioning, sampler, denoise):
    model, _, vae = loaded
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    raw = host.node("VAEEncode").encode(vae, image)[0]
    mask = torch.zeros(1, 64, 64)
    mask[..., 32:] = 1.0  # repaint the right half of both images
    (masked,) = host.node("SetLatentNoiseMask").set_mask(raw, mask)
    out = _sample(host, model, *conditioning, masked, sampler=sampler, denoise=denoise)
    kept, repainted = (slice(None, 4), slice(4, None))
    assert (out[..., kept] - raw["samples"][..., kept]).abs().max() <= 1e-5
    assert (out[..., repainted] - raw["samples"][..., repainted]).abs().mean() > 0.1


def _expected_switch(dit, a, b, neg, latent, steps, guidance, switch_sigma):
    """An independent Euler loop on the diffusers DiT: CFG with prompt a while sigma > switch_sigma, then prompt b
    (raw latent out)."""
    from unipic_core.inference.latents import LatentSpace
    from unipic_core.inference.schedule import flow_sigmas

    sigmas = flow_sigmas(steps, {"shift": 3.0})
    assert switch_sigma not in sigmas.tolist()
    x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SAMPLER_ARGS["seed"]))

    def velocity(conditioning, sigma):
        tokens, extras = conditioning[0]
        return dit(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=extras["pooled_output"],
                   timestep=torch.full((1,), sigma * 1000), return_dict=False)[0]

    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            v_pos, v_neg = velocity(a if sigma > switch_sigma else b, sigma), velocity(neg, sigma)
            x = x + (sigma_next - sigma) * (v_neg + guidance * (v_pos - v_neg))
    return LatentSpace(shift=0.0609, scale=1.5305).to_raw(x)


def test_timestep_ranges_switch_prompts_mid_sampling(host, loaded, tiny_kontext):
    model, text_encoders, _ = loaded
    a, neg = host.node("UniPic2TextEncode").encode(text_encoders, "a red cube", "blurry")
    b, _ = host.node("UniPic2TextEncode").encode(text_encoders, "a blue sphere", "blurry")
    timestep_range, combine = host.node("ConditioningSetTimestepRange"), host.node("ConditioningCombine")
    (first,), (second,) = timestep_range.set_range(a, 0.0, 0.5), timestep_range.set_range(b, 0.5, 1.0)
    (positive,) = combine.combine(first, second)
    latent = torch.zeros(1, 16, 8, 8)
    got = _sample(host, model, positive, neg, {"samples": latent})
    shift = tiny_kontext.scheduler_config["shift"]  # ComfyUI's percent_to_sigma for flow models: shifted 1 - percent
    expected = _expected_switch(tiny_kontext.transformer, a, b, neg, latent, SAMPLER_ARGS["steps"],
                                SAMPLER_ARGS["guidance"], switch_sigma=shift * 0.5 / (1 + (shift - 1) * 0.5))
    assert (got - expected).abs().max() <= 1e-4
    assert (got - _sample(host, model, a, neg, {"samples": latent})).abs().mean() > 1e-3


def test_a_full_timestep_range_keeps_todays_result_bit_exactly(host, loaded, conditioning):
    positive, negative = conditioning
    (ranged,) = host.node("ConditioningSetTimestepRange").set_range(positive, 0.0, 1.0)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    assert torch.equal(_sample(host, loaded[0], ranged, negative, latent),
                       _sample(host, loaded[0], positive, negative, latent))


def _native_custom_sample(model, positive, negative, latent, sigmas, seed, guidance, sampler_name="euler"):
    """SamplerCustomAdvanced (CFGGuider, RandomNoise, KSamplerSelect) on the given sigmas: ComfyUI's own path."""
    from comfy_extras import nodes_custom_sampler as custom

    guider = custom.CFGGuider.execute(model, positive, negative, guidance).result[0]
    return custom.SamplerCustomAdvanced.execute(custom.RandomNoise.execute(seed).result[0], guider,
                                                custom.KSamplerSelect.execute(sampler_name).result[0], sigmas,
                                                latent).result[0]["samples"]


def test_mask_conditioning_is_honoured_as_comfyui_samples_it(host, loaded, conditioning):
    from unipic_core.inference.schedule import flow_sigmas

    positive, negative = conditioning
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    (left_only,) = host.node("ConditioningSetMask").append(positive, mask, "default", 1.0)
    (combined,) = host.node("ConditioningCombine").combine(left_only, negative)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    ours = _sample(host, loaded[0], combined, negative, latent)
    native = _native_custom_sample(loaded[0], combined, negative, latent, flow_sigmas(SAMPLER_ARGS["steps"],
                                   {"shift": 3.0}), SAMPLER_ARGS["seed"], SAMPLER_ARGS["guidance"])
    assert (ours - native).abs().max() <= 1e-5
    assert (ours - _sample(host, loaded[0], positive, negative, latent)).abs().mean() > 1e-3


def _with_nan(conditioning, key):
    """A copy of the conditioning with one NaN in its tokens, pooled output or an attached reference latent."""
    tokens, extras = conditioning[0]
    tensors = {"tokens": tokens.clone(), "pooled_output": extras["pooled_output"].clone(),
               "reference_latents": torch.zeros(1, 16, 8, 8)}
    tensors[key].view(-1)[0] = float("nan")
    return [[tensors["tokens"], {**extras, "pooled_output": tensors["pooled_output"],
                                 "reference_latents": [tensors["reference_latents"]]}]]


@pytest.mark.parametrize("key, named", [
    ("tokens", "'positive' tokens"),
    ("pooled_output", "'positive' pooled_output"),
    ("reference_latents", "UniPic2 Kontext Reference: the reference latent"),
])
def test_nan_in_conditioning_is_named(host, loaded, conditioning, key, named):
    positive, negative = conditioning
    with pytest.raises(ValueError, match=f"{named} contains NaN or infinite values -- check the node that made it"):
        _sample(host, loaded[0], _with_nan(positive, key), negative, {"samples": torch.zeros(1, 16, 8, 8)})


@pytest.mark.parametrize("shape", [(1, 16, 0, 0), (0, 16, 8, 8)], ids=["0x0", "batch-0"])
def test_empty_latents_are_named(host, loaded, conditioning, shape):
    with pytest.raises(ValueError, match=r"UniPic2 Sampler: 'latent' is empty"):
        _sample(host, loaded[0], *conditioning, {"samples": torch.zeros(shape)})


def test_conditioning_of_batch_zero_is_named(host, loaded, conditioning):
    positive, negative = conditioning
    tokens, extras = positive[0]
    empty = [[tokens[:0], {**extras, "pooled_output": extras["pooled_output"][:0]}]]
    with pytest.raises(ValueError, match="'positive' has batch 0 .* one prompt for all images"):
        _sample(host, loaded[0], empty, negative, {"samples": torch.zeros(1, 16, 8, 8)})


def test_latent_beyond_the_position_grid_names_the_limit(host, loaded, conditioning, tiny_kontext):
    config = tiny_kontext.transformer.config
    limit = config.pos_embed_max_size * config.patch_size  # latent pixels per side
    with pytest.raises(ValueError, match=f"'latent' is 8x{limit + 2} latent pixels .* at most {limit} latent pixels "
                                         f"per side \\({limit * 8} px\\) -- use a smaller size"):
        _sample(host, loaded[0], *conditioning, {"samples": torch.zeros(1, 16, limit + 2, 8)})
