import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from unipic_core.inference.sampling import (GuidedVelocity, PromptEmbeds, euler_step, flow_sde_step, sample,
                                            step_log_prob)
from unipic_core.inference.schedule import flow_sigmas
from unipic_core.models.dit import DiffusersDiT
from unipic_core.models.text_encoding import encode_prompts


def _pipeline(components):
    te = components.text_encoders
    return StableDiffusion3Pipeline(
        transformer=components.transformer, vae=components.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config),
        text_encoder=te.clip_l, tokenizer=te.tokenizer_l, text_encoder_2=te.clip_g, tokenizer_2=te.tokenizer_g,
        text_encoder_3=te.t5, tokenizer_3=te.tokenizer_t5,
    )


def test_flow_sde_at_noise_level_zero_is_the_euler_step():
    sigmas = flow_sigmas(10, {"shift": 3.0})
    x, v = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    for i in (0, 4, 8):
        x_next, mean, std = flow_sde_step(x, v, sigmas, i, noise_level=0.0)
        assert std == 0.0
        assert torch.equal(x_next, euler_step(x, v, sigmas[i].item(), sigmas[i + 1].item()))


def test_flow_sde_step_matches_the_flow_grpo_formula():
    sigmas = flow_sigmas(10, {"shift": 3.0})
    x, v, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    for i in (0, 3):
        sigma, nxt = sigmas[i].item(), sigmas[i + 1].item()
        # at sigma = 1 the std uses the next sigma in the denominator
        s_t = 0.7 * math.sqrt(sigma / (1 - (sigmas[1].item() if sigma == 1.0 else sigma)))
        dt = nxt - sigma
        mean = x * (1 + s_t**2 / (2 * sigma) * dt) + v * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
        x_next, got_mean, std = flow_sde_step(x, v, sigmas, i, 0.7, eps)
        assert torch.allclose(got_mean, mean, atol=1e-6)
        assert math.isclose(std, s_t * math.sqrt(-dt), rel_tol=1e-9)
        assert torch.allclose(x_next, mean + std * eps, atol=1e-6)


def test_step_log_prob_is_the_mean_gaussian_log_density():
    mean, x_next = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = torch.distributions.Normal(mean, 0.3).log_prob(x_next).mean(dim=(1, 2, 3))
    assert torch.allclose(step_log_prob(x_next, mean, 0.3), expected, atol=1e-5)


def test_encode_prompts_equals_diffusers_sd3(tiny_kontext):
    pipe = _pipeline(tiny_kontext)
    prompts = ["a red cube on a table", "make the sky purple"]
    with torch.no_grad():
        tokens, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    ours = encode_prompts(tiny_kontext.text_encoders, prompts)
    assert ours.tokens.shape == tokens.shape == (2, 77 + 256, tiny_kontext.transformer.config.joint_attention_dim)
    assert torch.equal(ours.tokens, tokens) and torch.equal(ours.pooled, pooled)


def test_text_to_image_with_cfg_equals_diffusers_pipeline(tiny_kontext):
    pipe = _pipeline(tiny_kontext)
    pos = encode_prompts(tiny_kontext.text_encoders, ["a lighthouse at dusk"] * 2)
    neg = encode_prompts(tiny_kontext.text_encoders, ["blurry"] * 2)
    noise = torch.randn(2, 16, 12, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe(
            prompt_embeds=pos.tokens, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.tokens,
            negative_pooled_prompt_embeds=neg.pooled, latents=noise.clone(), height=96, width=64,
            num_inference_steps=6, guidance_scale=4.0, output_type="latent",
        ).images
        got = sample(DiffusersDiT(tiny_kontext.transformer), noise, flow_sigmas(6, tiny_kontext.scheduler_config), pos, neg,
                     guidance=4.0)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - noise).abs().mean() > 0.1  # it really denoised


def test_cfg_unequal_lengths_equals_two_forwards(tiny_kontext):
    model = DiffusersDiT(tiny_kontext.transformer)
    x = torch.randn(1, 16, 8, 8)
    pos = PromptEmbeds(torch.randn(1, 9, 32), torch.randn(1, 20))
    neg = PromptEmbeds(torch.randn(1, 5, 32), torch.randn(1, 20))
    with torch.no_grad():
        got = GuidedVelocity(model, pos, neg, 3.0, None, 1, x.device)(x, 0.6)
        v_pos = GuidedVelocity(model, pos, None, 3.0, None, 1, x.device)(x, 0.6)
        v_neg = GuidedVelocity(model, neg, None, 3.0, None, 1, x.device)(x, 0.6)
    assert torch.allclose(got, v_neg + 3.0 * (v_pos - v_neg), atol=1e-5)


def test_flow_sde_sampling_is_reproducible_per_seed(tiny_kontext):
    pos = encode_prompts(tiny_kontext.text_encoders, ["a cat"])
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = flow_sigmas(4, tiny_kontext.scheduler_config)

    def run(seed):
        with torch.no_grad():
            return sample(DiffusersDiT(tiny_kontext.transformer), noise, sigmas, pos, sampler="flow-sde", noise_level=0.7,
                          generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# --- noise masks (inpainting) and prompt schedules (timestep ranges), as ComfyUI's samplers do them ------------
