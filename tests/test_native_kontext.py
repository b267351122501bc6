"""UniPic2 Kontext Reference: a native SD3 MODEL (ComfyUI's Load Diffusion Model) edits as UniPic2-Kontext."""

import importlib
import logging

import pytest
import torch

UNET = "UniPic2-tiny-Kontext.safetensors"
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def unet_loader(host, tiny_kontext_dir, tmp_path_factory):
    """Load Diffusion Model, listing the tiny checkpoint's transformer file as a user would place it."""
    import folder_paths

    folder = tmp_path_factory.mktemp("diffusion_models")
    (folder / UNET).symlink_to(tiny_kontext_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    return lambda weight_dtype="default": host.node("UNETLoader").load_unet(UNET, weight_dtype)[0]


@pytest.fixture(scope="module")
def reference(host, loaded):
    """A raw VAE latent of a random 64x96 px image: 8x12 latent pixels, 24 tokens."""
    image = torch.rand(1, 96, 64, 3, generator=torch.Generator().manual_seed(0))
    return host.node("VAEEncode").encode(loaded[2], image)[0]


def kontext(host, model):
    return host.node("UniPic2KontextReference").patch(model)[0]


def native(module: str, node: str, *args):
    """Run one of ComfyUI's own (V3) nodes from comfy_extras and return its outputs."""
    cls = getattr(importlib.import_module(f"comfy_extras.{module}"), node)
    return cls.execute(*args).result


def with_reference(conditioning, latent):
    return native("nodes_edit_model", "ReferenceLatent", conditioning, latent)[0]


def ksampler(host, model, positive, negative, latent, steps=2, seed=4):
    return host.node("KSampler").sample(model, seed, steps, GUIDANCE, "euler", "simple", positive, negative,
                                        latent)[0]["samples"]


def official_sigmas(tiny_kontext, steps: int) -> torch.Tensor:
    """The schedule UniPic2 Sampler uses (shift from the checkpoint's scheduler config), as a native SIGMAS."""
    from unipic_core.inference.schedule import denoise_sigmas

    return denoise_sigmas(steps, 1.0, dict(tiny_kontext.scheduler_config))


@pytest.mark.parametrize("with_ref", [True, False], ids=["reference", "no-reference"])
def test_native_model_call_equals_the_diffusers_kontext_dit(host, unet_loader, tiny_kontext, with_ref):
    import comfy.model_management

    model = kontext(host, unet_loader())
    comfy.model_management.load_models_gpu([model])  # applies the object patches
    dit = tiny_kontext.transformer
    generator = torch.Generator().manual_seed(1)
    x, ref = torch.randn(2, 16, 8, 12, generator=generator), torch.randn(1, 16, 8, 12, generator=generator)
    context = torch.randn(2, 7, dit.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, dit.config.pooled_projection_dim, generator=generator)
    timestep = torch.tensor([700.0, 250.0])
    extra = {"unipic2_ref": ref.expand(2, -1, -1, -1)} if with_ref else {}
    with torch.no_grad():
        ours = model.model.diffusion_model(x, timestep, context=context, y=pooled, **extra)
        theirs = dit(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=timestep,
                     ref_hidden_states=ref.expand(2, -1, -1, -1) if with_ref else None, return_dict=False)[0]
    assert (ours - theirs).abs().max() <= 1e-5


def test_native_edit_equals_unipic2_sampler_with_the_official_sigmas(host, unet_loader, loaded, tiny_kontext,
                                                                     conditioning, reference):
    """6-step CFG edit, batch 2, reference on the positive only (the negative shares it, as officially)."""
    steps, seed = 6, 7
    latent = {"samples": torch.zeros(2, 16, 8, 12)}
    positive = with_reference(conditioning[0], reference)
    model = kontext(host, unet_loader()).clone()
    batches = []

    def record_batch(apply_model, args):  # one model call per step = cond and uncond batched together
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record_batch)
    guider = native("nodes_custom_sampler", "CFGGuider", model, positive, conditioning[1], GUIDANCE)[0]
    ours = native("nodes_custom_sampler", "SamplerCustomAdvanced",
                  native("nodes_custom_sampler", "RandomNoise", seed)[0], guider,
                  native("nodes_custom_sampler", "KSamplerSelect", "euler")[0],
                  official_sigmas(tiny_kontext, steps), latent)[0]["samples"]
    pack = host.node("UniPic2Sampler").sample(loaded[0], positive, conditioning[1], latent, seed=seed, steps=steps,
                                              guidance=GUIDANCE, sampler="euler", noise_level=0.7, shift=0.0,
                                              denoise=1.0)[0]["samples"]
    assert batches == [4] * steps
    assert (ours - pack).abs().max() <= 1e-4
    assert (ours - pack).abs().max() < 1e-2 * pack.abs().max()  # not two near-zero latents


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_ksampler_edits_with_the_reference(host, unet_loader, conditioning, reference, weight_dtype):
    model = kontext(host, unet_loader(weight_dtype))
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    edit = ksampler(host, model, with_reference(conditioning[0], reference), conditioning[1], latent)
    text_only = ksampler(host, model, *conditioning, latent)
    assert torch.isfinite(edit).all()
    assert (edit - text_only).abs().max() > 1e-2


def test_without_reference_the_patched_model_equals_the_native_model(host, unet_loader, conditioning):
    plain = unet_loader()
    latent = {"samples": torch.zeros(2, 16, 8, 12)}
    assert torch.equal(ksampler(host, kontext(host, plain), *conditioning, latent),
                       ksampler(host, plain, *conditioning, latent))


def test_applying_it_twice_changes_nothing(host, unet_loader, conditioning, reference):
    import comfy.patcher_extension

    once = kontext(host, unet_loader())
    twice = kontext(host, once)
    assert twice.get_model_object("memory_usage_factor_conds").count("unipic2_ref") == 1
    assert len(twice.get_wrappers(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "unipic2_kontext")) == 1
    positive, latent = with_reference(conditioning[0], reference), {"samples": torch.zeros(1, 16, 8, 12)}
    assert torch.equal(ksampler(host, twice, positive, conditioning[1], latent),
                       ksampler(host, once, positive, conditioning[1], latent))


def test_memory_estimate_counts_the_reference_tokens(host, unet_loader, conditioning, reference, monkeypatch):
    import comfy.model_base

    estimated = []
    memory_required = comfy.model_base.SD3.memory_required

    def spy(self, input_shape, cond_shapes={}):
        estimated.append((list(input_shape), [list(s) for s in cond_shapes.get("unipic2_ref", [])]))
        return memory_required(self, input_shape, cond_shapes)

    monkeypatch.setattr(comfy.model_base.SD3, "memory_required", spy)
    ksampler(host, kontext(host, unet_loader()), with_reference(conditioning[0], reference), conditioning[1],
             {"samples": torch.zeros(1, 16, 8, 12)}, steps=1)
    # before loading: CFG's 2 x [1, 16, 8, 12] target plus as much reference; in the loop: the reference cond
    assert estimated[0] == ([2, 16, 16, 12], [])
    assert ([2, 16, 8, 12], [[1, 16, 8, 12], [1, 16, 8, 12]]) in estimated


def test_reference_of_another_size_is_resized_and_reported_once(host, unet_loader, conditioning, reference, caplog):
    model = kontext(host, unet_loader())
    latent = {"samples": torch.zeros(1, 16, 8, 12)}
    small = {"samples": torch.nn.functional.interpolate(reference["samples"], size=(4, 6), mode="bilinear")}
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        out = ksampler(host, model, with_reference(conditioning[0], small), conditioning[1], latent)
    assert out.shape == (1, 16, 8, 12)
    assert [r.getMessage() for r in caplog.records].count(
        "UniPic2 Kontext Reference: reference latent (4, 6) resized to the output latent (8, 12); for best results "
        "encode the reference at the output size (UniPic2 Edit Reference does)") == 1


def test_two_references_are_refused_with_a_fix(host, unet_loader, conditioning, reference):
    twice = with_reference(with_reference(conditioning[0], reference), reference)
    with pytest.raises(ValueError, match="UniPic2 Kontext Reference: 2 reference latents .* remove the extra"):
        ksampler(host, kontext(host, unet_loader()), twice, conditioning[1], {"samples": torch.zeros(1, 16, 8, 12)})


def test_a_controlnet_with_a_reference_is_refused(host, unet_loader, conditioning, reference):
    import comfy.controlnet

    # ComfyUI's ControlNet base: refused before its weights would be needed
    positive = [[tokens, {**extras, "control": comfy.controlnet.ControlBase()}]
                for tokens, extras in with_reference(conditioning[0], reference)]
    with pytest.raises(ValueError, match="UniPic2 Kontext Reference: a ControlNet together with a reference"):
        ksampler(host, kontext(host, unet_loader()), positive, conditioning[1], {"samples": torch.zeros(1, 16, 8, 12)})


def test_a_model_that_is_not_sd3_is_refused(host):
    class NotSD3:
        model = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="UniPic2 Kontext Reference: 'model' is a Linear model; it needs an SD3"):
        kontext(host, NotSD3())


def test_partial_load_gives_the_full_load_output_with_weights_offloaded(host, unet_loader, tiny_kontext, reference):
    model = kontext(host, unet_loader())
    config = tiny_kontext.transformer.config
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 8, 12, generator=generator)
    context = torch.randn(2, 7, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    ref = model.model.process_latent_in(reference["samples"]).expand(2, -1, -1, -1)

    def denoised(lowvram_model_memory):
        model.patch_model(torch.device("cpu"), lowvram_model_memory=lowvram_model_memory)
        cast = sum(getattr(m, "comfy_cast_weights", False) for m in model.model.modules())
        with torch.no_grad():
            out = model.model.apply_model(x, torch.tensor([0.7, 0.3]), c_crossattn=context, y=pooled,
                                          unipic2_ref=ref)
        model.unpatch_model(torch.device("cpu"))
        return out, cast

    full, cast_full = denoised(0)
    partial, cast_partial = denoised(1)
    assert cast_full == 0 and cast_partial > 10  # weights cast on the fly = left on the offload device
    assert torch.equal(partial, full)
