"""Load UniPic2 Kontext gives native ComfyUI types (MODEL, VAE) equal to the official diffusers modules, and UniPic2
Sampler on them gives the engine's (diffusers) sampling loop's latents."""

import json
import shutil

import pytest
import torch

from conftest import TINY_KONTEXT as TINY, native_tiny_dit

# fp32 on the CPU, measured: VAE encode 6e-7, decode 3.5e-6 (native VAE vs diffusers AutoencoderKL); 5-step
# sampling 5e-7 (euler t2i), 1.3e-6 (euler CFG edit), 2.4e-6 (flow-sde edit) on latents of magnitude ~1-4
VAE_TOLERANCE = 1e-4
SAMPLING_TOLERANCE = 1e-4


def native_loading(host):
    return host.module("nodes.host.native_loading")


def model_sampling_sd3(model, shift):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift)[0]


def test_loader_gives_a_native_sd3_model_that_edits_with_the_checkpoints_shift(host, loaded, tiny_kontext):
    import comfy.model_base
    import comfy.sd

    model, _, vae = loaded
    assert isinstance(model.model, comfy.model_base.SD3) and isinstance(vae, comfy.sd.VAE)
    assert host.module("nodes.host.native_kontext").has_kontext_reference(model)
    assert model.get_model_object("model_sampling").shift == tiny_kontext.scheduler_config["shift"] == 3.0
    assert model.model.diffusion_model.x_embedder.proj.weight.dtype == torch.float32


def test_the_checkpoint_name_is_recorded_and_survives_clones(host, loaded):
    checkpoint_name = host.module("nodes.host.memory").checkpoint_name
    assert checkpoint_name(loaded[0]) == TINY
    assert checkpoint_name(model_sampling_sd3(loaded[0], 2.0)) == TINY
    assert checkpoint_name(host.module("nodes.host.native_kontext").with_kontext_reference(loaded[0].clone())) == TINY


def test_a_model_from_another_loader_has_no_checkpoint_name(host, native_model):
    assert host.module("nodes.host.memory").checkpoint_name(native_model) == ""


def test_native_dit_weights_equal_the_official_transformer(loaded, tiny_kontext):
    dit = loaded[0].model.diffusion_model
    theirs = tiny_kontext.transformer
    assert torch.equal(dit.x_embedder.proj.weight, theirs.pos_embed.proj.weight)
    assert torch.equal(dit.joint_blocks[1].x_block.attn.proj.weight, theirs.transformer_blocks[1].attn.to_out[0].weight)
    assert dit.pos_embed_max_size == theirs.config.pos_embed_max_size


@pytest.mark.parametrize("choice, dtype", [("fp8_e4m3fn", torch.float8_e4m3fn), ("fp32", torch.float32)])
def test_dtype_choice_sets_the_dits_weight_dtype(host, tiny_kontext_dir, choice, dtype):
    from pathlib import Path

    loader_nodes = host.module("nodes.loader_nodes")
    model, vae = loader_nodes.native_dit_and_vae(Path(tiny_kontext_dir), choice)
    assert model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == dtype
    assert vae.vae_dtype == torch.float32  # on the CPU ComfyUI keeps the VAE in fp32 either way
    assert loader_nodes.encoder_dtype(choice) == torch.float32  # fp8 never reaches the text encoders


def test_a_sharded_transformer_loads_the_same_weights(host, loaded, tiny_kontext, tiny_kontext_dir, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_kontext_dir, folder, ignore=shutil.ignore_patterns("transformer"))
    tiny_kontext.transformer.save_pretrained(str(folder / "transformer"), max_shard_size="200KB")
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    model = native_loading(host).load_native_dit(folder, {"shift": 3.0}, {"dtype": torch.float32})
    ours, theirs = model.model.diffusion_model.state_dict(), loaded[0].model.diffusion_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_transformer_comfyui_does_not_detect_as_sd3_is_refused(host, tmp_path):
    from unipic_core.models.kontext_transformer import KontextSD3Transformer

    folder = tmp_path / "not-sd3"  # hidden 128 with 3 layers: ComfyUI's MMDiT needs hidden = 64 x depth
    KontextSD3Transformer(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                          attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                          caption_projection_dim=128, pooled_projection_dim=20, pos_embed_max_size=32,
                          qk_norm="rms_norm").save_pretrained(str(folder / "transformer"))
    with pytest.raises(ValueError, match=r"not-sd3/transformer: ComfyUI detects no SD3 / SD3.5 MMDiT it can load .* "
                                         r"hidden size = 64 x depth"):
        native_loading(host).load_native_dit(folder, {"shift": 3.0}, {})


def test_a_transformer_with_a_missing_or_foreign_key_is_refused_naming_it(host, tiny_kontext_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_kontext_dir / "transformer", folder / "transformer")
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights["context_embedder.wieght"] = weights.pop("context_embedder.weight")
    save_file(weights, str(path))
    with pytest.raises(ValueError, match=r"renamed/transformer: weights do not match transformer/config.json -- "
                                         r"missing: context_embedder.weight; unexpected: context_embedder.wieght"):
        native_loading(host).load_native_dit(folder, {"shift": 3.0}, {})


def test_missing_transformer_weights_name_the_file(host, tiny_kontext_dir, tmp_path):
    (tmp_path / "empty" / "transformer").mkdir(parents=True)
    shutil.copy(tiny_kontext_dir / "transformer" / "config.json", tmp_path / "empty" / "transformer")
    with pytest.raises(ValueError, match=r"'transformer/diffusion_pytorch_model.safetensors' \(or its sharded"):
        native_loading(host).load_native_dit(tmp_path / "empty", {"shift": 3.0}, {})


def test_dynamic_shifting_is_refused(host, tiny_kontext_dir):
    with pytest.raises(ValueError, match="enables use_dynamic_shifting"):
        native_loading(host).load_native_dit(tiny_kontext_dir, {"shift": 3.0, "use_dynamic_shifting": True}, {})


def test_native_vae_has_every_weight_and_matches_the_diffusers_vae(loaded, tiny_kontext):
    vae, theirs = loaded[2], tiny_kontext.vae
    assert vae.latent_channels == 16
    image = torch.rand(2, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_raw = theirs.encode(image.movedim(-1, 1) * 2 - 1).latent_dist.mode()
        expected_image = ((theirs.decode(expected_raw).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    raw = vae.encode(image)
    assert raw.shape == (2, 16, 8, 12)
    assert (raw - expected_raw).abs().max() <= VAE_TOLERANCE
    assert (vae.decode(expected_raw) - expected_image).abs().max() <= VAE_TOLERANCE
    assert expected_raw.abs().max() > 0.05  # not two near-zero latents


def test_a_tiny_checkpoint_with_the_native_vae_loads_in_comfyuis_own_loaders(host, tmp_path):
    """`python -m unipic_core.tiny --native-vae`: transformer/ loads in Load Diffusion Model and vae/ (SD3's widths,
    which VAELoader hard-codes) in VAELoader, and that VAE decodes as the pack's loader's VAE and diffusers do.
    The tests' default tiny checkpoints keep narrow VAEs (fast enough for every test), read by the pack's loader."""
    import folder_paths
    from diffusers import AutoencoderKL

    from unipic_core.tiny import write_kontext_folder

    folder = write_kontext_folder(tmp_path / "UniPic2-tiny-native", native_vae=True)
    for kind, sub in (("vae", "vae"), ("diffusion_models", "transformer")):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "tiny_native.safetensors").symlink_to(folder / sub / "diffusion_pytorch_model.safetensors")
        folder_paths.add_model_folder_path(kind, str(tmp_path / kind))
    dit = host.node("UNETLoader").load_unet("tiny_native.safetensors", "default")[0]
    assert type(dit.model).__name__ == "SD3"
    native = host.node("VAELoader").load_vae("tiny_native.safetensors")[0]
    ours = native_loading(host).load_native_vae(folder, torch.float32)
    official = AutoencoderKL.from_pretrained(str(folder / "vae"))
    raw = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ((official.decode(raw).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert native.latent_channels == 16
    assert (native.decode(raw) - expected).abs().max() <= VAE_TOLERANCE
    assert (ours.decode(raw) - expected).abs().max() <= VAE_TOLERANCE


def test_the_vae_loader_leaves_no_weight_missing_or_unused(host, tiny_kontext_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "vae-missing"
    shutil.copytree(tiny_kontext_dir / "vae", folder / "vae")
    weights = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    del weights["decoder.conv_out.bias"]
    save_file(weights, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"vae: weights do not match vae/config.json -- missing: decoder.conv_out.bias"):
        native_loading(host).load_native_vae(folder)


def test_a_vae_that_is_not_sd3s_latent_space_is_refused(host, tiny_kontext_dir, tmp_path):
    folder = tmp_path / "sdxl-like"
    shutil.copytree(tiny_kontext_dir / "vae", folder / "vae")
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025, "shift_factor": None}))
    with pytest.raises(ValueError, match=r"scaling_factor 0.13025, shift_factor 0.0.* use the checkpoint's own SD3 VAE"):
        native_loading(host).load_native_vae(folder)


# --- UniPic2 Sampler on the native MODEL equals the engine's diffusers loop ----------------------------------

def engine_sample(tiny_kontext, positive, negative, raw_shape, seed, steps, guidance, sampler="euler",
                  reference=None):
    """The pack's previous sampler: unipic_core.inference.sampling.sample with the diffusers transformer (raw latent
    out)."""
    from unipic_core.inference.latents import LatentSpace
    from unipic_core.inference.sampling import PromptEmbeds, sample
    from unipic_core.inference.schedule import flow_sigmas
    from unipic_core.models.dit import DiffusersDiT

    def embeds(conditioning):
        return PromptEmbeds(conditioning[0][0], conditioning[0][1]["pooled_output"])

    sd3 = LatentSpace(shift=0.0609, scale=1.5305)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(raw_shape, generator=generator, dtype=torch.float32)
    ref = None if reference is None else sd3.to_model(reference)
    with torch.no_grad():
        x = sample(DiffusersDiT(tiny_kontext.transformer), noise, flow_sigmas(steps, tiny_kontext.scheduler_config),
                   embeds(positive), embeds(negative), guidance=guidance, reference=ref, sampler=sampler,
                   noise_level=0.7, generator=generator)
    return sd3.to_raw(x)


@pytest.mark.parametrize("case", ["euler-t2i", "euler-edit-cfg", "flow-sde-edit"])
def test_sampler_equals_the_engines_diffusers_loop(host, loaded, tiny_kontext, conditioning, case):
    positive, negative = conditioning
    reference = None
    latent = {"samples": torch.zeros(2, 16, 8, 12)}
    guidance = 1.0 if case == "euler-t2i" else 3.5
    if case != "euler-t2i":
        image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(5))
        positive, negative, _ = host.node("UniPic2EditReference").attach(loaded[2], image, positive, negative,
                                                                         "keep size", 512, 32)
        reference = positive[0][1]["reference_latents"][0]
    sampler = "flow-sde" if case.startswith("flow-sde") else "euler"
    ours = host.node("UniPic2Sampler").sample(loaded[0], positive, negative, latent, seed=11, steps=5,
                                              guidance=guidance, sampler=sampler, noise_level=0.7, shift=0.0,
                                              denoise=1.0)[0]["samples"]
    theirs = engine_sample(tiny_kontext, positive, negative, (2, 16, 8, 12), 11, 5, guidance, sampler, reference)
    assert (ours - theirs).abs().max() <= SAMPLING_TOLERANCE
    assert theirs.abs().max() > 0.1 and not torch.equal(ours[0], ours[1])


def test_sampler_adds_the_reference_ability_to_a_plain_native_model(host, loaded, conditioning, tiny_kontext_dir):
    plain = native_tiny_dit(tiny_kontext_dir, dtype=torch.float32)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    positive, negative, latent = host.node("UniPic2EditReference").attach(loaded[2], image, *conditioning,
                                                                          "keep size", 512, 32)
    args = dict(seed=2, steps=3, guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)
    sampler = host.node("UniPic2Sampler")
    from_plain = sampler.sample(plain, positive, negative, latent, **args)[0]["samples"]
    assert torch.equal(from_plain, sampler.sample(loaded[0], positive, negative, latent, **args)[0]["samples"])
    assert not torch.equal(from_plain, sampler.sample(plain, *conditioning, latent, **args)[0]["samples"])


def test_shift_input_replaces_the_models_shift(host, loaded, conditioning):
    sampler = host.node("UniPic2Sampler")
    args = dict(seed=2, steps=3, guidance=1.0, sampler="euler", noise_level=0.7, denoise=1.0)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    shifted_model = model_sampling_sd3(loaded[0], 6.0)
    by_input = sampler.sample(loaded[0], *conditioning, latent, shift=6.0, **args)[0]["samples"]
    assert torch.equal(by_input, sampler.sample(shifted_model, *conditioning, latent, shift=0.0, **args)[0]["samples"])
    assert not torch.equal(by_input, sampler.sample(loaded[0], *conditioning, latent, shift=0.0, **args)[0]["samples"])


def test_a_model_that_is_not_sd3_is_refused_by_the_sampler(host, conditioning):
    class NotSD3:
        model = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="UniPic2 Sampler: 'model' is a Linear model; .* use KSampler"):
        host.node("UniPic2Sampler").sample(NotSD3(), *conditioning, {"samples": torch.zeros(1, 16, 8, 8)}, seed=0,
                                           steps=1, guidance=1.0, sampler="euler", noise_level=0.7, shift=0.0,
                                           denoise=1.0)
