"""Flow-GRPO maths: log-prob, ratio, KL, advantages and the clipped loss (docs/architecture.md §6); Flow-GRPO-Fast's
CPS step and stochastic window."""

import math

import pytest
import torch

from conftest import randomise_lora_b
from unipic_core.inference.sampling import (GuidedVelocity, PromptEmbeds, cps_log_prob, cps_mean, flow_sde_mean,
                                            flow_sde_step, step_log_prob)
from unipic_core.inference.schedule import flow_sigmas
from unipic_core.models.lora import add_lora
from unipic_core.training.grpo import (CPS_STEP, group_advantages, grpo_loss, sample_trajectory, sde_window,
                                       step_policy, trained_steps)


def test_log_prob_equals_an_independent_gaussian_log_density():
    sigmas = flow_sigmas(10, {"shift": 3.0})
    x, v, eps = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    for i in (0, 5, 9):  # the first step (sigma = 1) and the last (to sigma = 0) included
        x_next, mean, std = flow_sde_step(x, v, sigmas, i, 0.7, eps)
        expected = torch.distributions.Normal(mean.double(), std).log_prob(x_next.double()).mean(dim=(1, 2, 3))
        assert torch.allclose(step_log_prob(x_next, mean, std).double(), expected, atol=1e-5)


def test_noise_level_zero_mean_is_the_euler_step():
    sigmas = flow_sigmas(6, {"shift": 3.0})
    x, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mean, std = flow_sde_mean(x, v, sigmas, 2, 0.0)
    assert std == 0.0 and torch.equal(mean, x + (sigmas[3] - sigmas[2]).item() * v)


def _velocity(dit, batch):
    config = dit.transformer.config
    torch.manual_seed(1)
    pos = PromptEmbeds(torch.randn(1, 5, config.joint_attention_dim), torch.randn(1, config.pooled_projection_dim))
    neg = PromptEmbeds(torch.randn(1, 5, config.joint_attention_dim), torch.randn(1, config.pooled_projection_dim))
    return GuidedVelocity(dit, pos, neg, 3.5, None, batch, torch.device("cpu"))


def _trajectory(dit, sigmas, batch=3):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 16, 8, 8, generator=g)
    step_noise = torch.randn(len(sigmas) - 1, batch, 16, 8, 8, generator=g)
    return sample_trajectory(_velocity(dit, batch), noise, sigmas, 0.7, step_noise)


@pytest.fixture
def rollout(fresh_dit):
    """A DiT with a trained-looking LoRA, a 4-step SDE trajectory of 3 images sampled with it, and its velocity."""
    add_lora(fresh_dit, 4, 8, seed=0)
    randomise_lora_b(fresh_dit)
    sigmas = flow_sigmas(4, {"shift": 3.0})
    return fresh_dit, sigmas, _trajectory(fresh_dit, sigmas), _velocity(fresh_dit, 3)


def test_ratio_is_exactly_one_on_the_first_update(rollout):
    _, sigmas, trajectory, velocity = rollout
    for j in range(4):
        log_prob, _ = step_policy(velocity, trajectory, sigmas, j, 0.7)
        assert log_prob.requires_grad
        assert torch.equal(torch.exp(log_prob - trajectory.log_prob(j)), torch.ones(3))


def test_kl_is_zero_with_the_lora_disabled(rollout):
    fresh_dit, sigmas, trajectory, velocity = rollout
    log_prob, with_lora = step_policy(velocity, trajectory, sigmas, 1, 0.7)
    with fresh_dit.adapter_disabled():
        _, without = step_policy(velocity, trajectory, sigmas, 1, 0.7)
        _, ref = step_policy(velocity, trajectory, sigmas, 1, 0.7)
    adv = torch.zeros(3)
    assert grpo_loss(log_prob, trajectory.log_prob(1), adv, 1e-4, 0.04, without, ref, 0.5).kl.item() == 0.0
    assert grpo_loss(log_prob, trajectory.log_prob(1), adv, 1e-4, 0.04, with_lora, ref, 0.5).kl.item() > 0.0


def test_kl_matches_the_design_formula():
    mean, ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    terms = grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, beta=0.5, mean=mean, ref_mean=ref, s_t=0.3)
    expected = ((mean - ref) ** 2).mean(dim=(1, 2, 3)).mean() / (2 * 0.3**2)
    assert torch.allclose(terms.kl, expected) and torch.allclose(terms.loss, 0.5 * expected)


def test_constant_reward_group_has_zero_advantage_and_no_gradient():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.1, 0.9, 0.5, 0.2])
    advantages = group_advantages(rewards, 4)
    assert torch.equal(advantages[:4], torch.zeros(4))
    assert advantages[4:].abs().sum() > 0
    log_prob = torch.zeros(4, requires_grad=True)
    grpo_loss(log_prob, torch.zeros(4), advantages[:4], 1e-4).loss.backward()
    assert torch.equal(log_prob.grad, torch.zeros(4))


def test_advantages_are_normalised_per_group_or_batch_and_clipped():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    per_group = group_advantages(rewards, 3)
    assert torch.allclose(per_group[:3], per_group[3:], atol=1e-3)  # each group normalised by its own std
    batch = group_advantages(rewards, 3, batch_std=True)
    assert torch.allclose(batch, (rewards.reshape(2, 3) - rewards.reshape(2, 3).mean(1, keepdim=True)).reshape(-1)
                          / (rewards.std(correction=0) + 1e-4))
    spiky = torch.tensor([0.0] * 99 + [1.0])
    assert group_advantages(spiky, 100).max().item() == 5.0


def test_clip_bounds_the_ratio():
    eps, adv = 0.2, torch.tensor([1.0, -1.0, 1.0, -1.0])
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    terms = grpo_loss(log_ratio, torch.zeros(4), adv, eps)
    # Positive advantage: the gain stops at 1 + eps; negative: at 1 - eps. The other two stay unclipped.
    expected = torch.tensor([-1.2, 0.8, -0.5, 1.5]).mean()
    assert torch.allclose(terms.loss, expected)
    terms.loss.backward()
    assert log_ratio.grad[0] == 0 and log_ratio.grad[1] == 0
    assert log_ratio.grad[2] != 0 and log_ratio.grad[3] != 0
    assert terms.clip_fraction.item() == 1.0


def test_trained_steps_follow_the_timestep_fraction():
    assert trained_steps(10, 0.99) == list(range(9))
    assert trained_steps(10, 1.0) == list(range(10))
    assert trained_steps(3, 0.1) == [0]
    with pytest.raises(ValueError, match="timestep_fraction"):
        trained_steps(10, 0.0)


# --- Flow-GRPO-Fast ------------------------------------------------------------------------------------------

def test_cps_step_follows_its_formula_term_by_term():
    sigmas = flow_sigmas(10, {"shift": 3.0})
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    i, a = 2, 0.8
    sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
    mean, std = cps_mean(x, v, sigmas, i, a)
    assert std == pytest.approx(sigma_next * math.sin(a * math.pi / 2))
    x0, x1 = x - sigma * v, x + (1 - sigma) * v  # the clean and the noise estimates
    assert torch.allclose(mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, atol=1e-6)
    x_next = mean + std * torch.randn_like(mean)
    assert torch.allclose(cps_log_prob(x_next, mean, std), -((x_next - mean) ** 2).mean(dim=(1, 2, 3)))
    euler, zero = cps_mean(x, v, sigmas, i, 0.0)
    assert zero == 0.0 and torch.allclose(euler, x + (sigma_next - sigma) * v, atol=1e-6)


def test_the_window_starts_in_the_first_half_and_has_the_asked_length():
    starts = {sde_window(10, 3, torch.Generator().manual_seed(seed))[0] for seed in range(50)}
    assert starts == {0, 1, 2}  # the repository's range (0, 5) for a 3-step window of 10
    assert sde_window(10, 3, torch.Generator().manual_seed(7)) == sde_window(10, 3, torch.Generator().manual_seed(7))
    assert len(sde_window(10, 3, torch.Generator().manual_seed(1))) == 3
    assert sde_window(2, 3, torch.Generator()) == [0, 1]  # a window longer than the schedule is the schedule


def test_outside_the_window_the_trajectory_is_deterministic(fresh_dit):
    sigmas = flow_sigmas(6, {"shift": 3.0})
    g = torch.Generator().manual_seed(0)
    noise, step_noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(6, 2, 16, 8, 8, generator=g)
    velocity = _velocity(fresh_dit, 2)
    window = [1, 2]
    base = sample_trajectory(velocity, noise, sigmas, 0.8, step_noise, CPS_STEP, window)
    assert base.steps == window and base.log_probs.shape == (2, 2)
    other_noise = step_noise.clone()
    other_noise[[0, 3, 4, 5]] = torch.randn(4, 2, 16, 8, 8)
    same = sample_trajectory(velocity, noise, sigmas, 0.8, other_noise, CPS_STEP, window)
    assert torch.equal(same.final, base.final)  # the noise of steps outside the window is never used
    other_noise[1] += 1.0
    assert not torch.equal(sample_trajectory(velocity, noise, sigmas, 0.8, other_noise, CPS_STEP, window).final,
                           base.final)
    assert torch.equal(base.latents[1], noise + (sigmas[1] - sigmas[0]).item() * velocity(noise, sigmas[0].item()))
    log_prob, _ = step_policy(velocity, base, sigmas, 2, 0.8, CPS_STEP)
    assert torch.equal(log_prob, base.log_prob(2))  # re-scoring a window step under the same model: ratio 1
