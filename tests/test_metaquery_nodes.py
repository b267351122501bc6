"""MetaQuery loader, encode and understand nodes inside the real ComfyUI host."""

import logging

import pytest
import torch

MQ = "UniPic2-tiny-MetaQuery"
INSIDE = "(inside the checkpoint)"


@pytest.fixture(scope="module")
def loaded(host):
    return host.node("LoadUniPic2MetaQuery").load(MQ, INSIDE, "fp32", "default")


def encode(host, loaded, image=None, with_vae=True, prompt="make it snow", size=("longer edge", 128, 32)):
    extra = {} if image is None else {"image": image, **({"vae": loaded[2]} if with_vae else {})}
    return host.node("UniPic2MetaQueryEncode").encode(loaded[1], prompt, "blurry", *size, **extra)


def sample(host, loaded, positive, negative, latent, seed=0):
    return host.node("UniPic2Sampler").sample(loaded[0], positive, negative, latent, seed=seed, steps=2,
                                              guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0,
                                              denoise=1.0)[0]["samples"]


def test_loader_lists_metaquery_folders_and_mllm_choices(host):
    spec = host.nodes.NODE_CLASS_MAPPINGS["LoadUniPic2MetaQuery"].INPUT_TYPES()["required"]
    assert MQ in spec["checkpoint"][0] and "Skywork/UniPic2-Metaquery-9B" in spec["checkpoint"][0]
    assert "UniPic2-tiny-Kontext" not in spec["checkpoint"][0]  # no conditioner/: not a MetaQuery folder
    assert spec["mllm"][0][0] == INSIDE and "Qwen/Qwen2.5-VL-7B-Instruct" in spec["mllm"][0]


def test_loader_gives_the_native_model_and_vae(host, loaded):
    import comfy.model_base
    import comfy.sd

    memory = host.module("nodes.host.memory")
    assert isinstance(loaded[0].model, comfy.model_base.SD3) and isinstance(loaded[2], comfy.sd.VAE)
    assert host.module("nodes.host.native_kontext").has_kontext_reference(loaded[0])
    assert memory.checkpoint_name(loaded[0]) == MQ


def test_mllm_and_conditioner_have_their_own_patchers(loaded):
    mllm = loaded[1]
    assert mllm.mllm_patcher is not mllm.conditioner_patcher
    assert mllm.mllm_patcher.model.module is mllm.encoder.mllm
    assert mllm.conditioner_patcher.model.module is mllm.encoder.conditioner
    sizes = (mllm.mllm_patcher.model_size(), mllm.conditioner_patcher.model_size())
    assert all(size > 0 for size in sizes) and sizes[0] != sizes[1]


def test_edit_conditioning_attaches_the_reference_and_samples(host, loaded):
    picture = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    positive, negative, latent = encode(host, loaded, picture)
    reference = positive[0][1]["reference_latents"][0]
    assert reference.shape == latent["samples"].shape == (1, 16, 12, 16)
    assert torch.equal(negative[0][1]["reference_latents"][0], reference)
    assert positive[0][0].shape == (1, 256, loaded[0].get_model_object("diffusion_model").context_embedder.in_features)
    # the reference is the native VAE's latent of the image
    assert torch.equal(reference, loaded[2].encode(picture[..., :3]).float())
    edited = sample(host, loaded, positive, negative, latent)
    mllm_only = sample(host, loaded, *encode(host, loaded, picture, with_vae=False)[:2], latent)
    assert edited.shape == (1, 16, 12, 16)
    assert not torch.allclose(edited, mllm_only)  # the DiT reference changes the result


def test_text_to_image_latent_is_square_at_the_longer_edge(host, loaded):
    positive, negative, latent = encode(host, loaded)
    assert "reference_latents" not in positive[0][1]
    assert latent["samples"].shape == (1, 16, 16, 16)
    assert sample(host, loaded, positive, negative, latent).shape == (1, 16, 16, 16)


def test_too_large_image_is_resized_and_reported(host, loaded, caplog):
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        _, _, latent = encode(host, loaded, torch.rand(1, 600, 800, 3), size=("longer edge", 256, 32))
    assert latent["samples"].shape == (1, 16, 192 // 8, 256 // 8)
    assert "'image' resized from 800x600 to 256x192" in caplog.text


def test_encoding_the_same_prompt_and_image_twice_reuses_the_result(host):
    prompt = {
        "1": {"class_type": "LoadUniPic2MetaQuery", "inputs": {"checkpoint": MQ, "mllm": INSIDE, "dtype": "fp32", "mllm_weights": "default"}},
        "2": {"class_type": "UniPic2MetaQueryEncode", "inputs": {
            "mllm": ["1", 1], "prompt": "a red fox", "negative_prompt": "", "size_policy": "longer edge",
            "longer_edge": 64, "multiple_of": 32}},
        "3": {"class_type": "UniPic2Sampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 1], "latent": ["2", 2], "seed": 1, "steps": 1,
            "guidance": 3.5, "sampler": "euler", "noise_level": 0.7, "shift": 0.0, "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"vae": ["1", 2], "samples": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "mq"}},
    }
    executed = []
    for seed in (1, 2):
        prompt["3"]["inputs"]["seed"] = seed
        success, messages = host.execute(prompt)
        assert success, messages
        executed.append({data["node"] for event, data in messages if event == "executing" and data["node"]})
    assert "2" in executed[0] and "3" in executed[0]
    assert "2" not in executed[1] and "3" in executed[1]  # the sampler re-ran, the encode did not


def test_understand_returns_a_deterministic_answer(host, loaded):
    picture = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(1))
    node = host.node("UniPic2Understand")
    first = node.answer(loaded[1], picture, "What is in the picture?", 8, True, 0.7, 0.9, 5)
    again = node.answer(loaded[1], picture, "What is in the picture?", 8, True, 0.7, 0.9, 5)
    assert first["result"][0] and first["ui"]["text"] == [first["result"][0]]
    assert first == again


def test_understand_rejects_a_tiny_image(host, loaded):
    with pytest.raises(ValueError, match=r"UniPic2 Understand: 'image'.*at least 64 px"):
        host.node("UniPic2Understand").answer(loaded[1], torch.rand(1, 20, 20, 3), "?", 8, False, 0.7, 0.9, 0)
