"""DiffusionNFT maths against its formulas (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py): optimality
probability, forward points, implicit policies, adaptive x0 loss, KL term, old-policy decay, and its sampler."""

import pytest
import torch

from unipic_core.inference.sampling import euler_step
from unipic_core.inference.schedule import flow_sigmas
from unipic_core.training.nft import (adaptive_x0_loss, follow, forward_point, nft_loss, old_policy_decay, optimality,
                                      sample_clean)


def test_optimality_maps_clipped_advantages_onto_zero_to_one():
    advantages = torch.tensor([-5.0, -1.0, 0.0, 2.5, 5.0, 7.0])
    assert torch.allclose(optimality(advantages, 5.0), torch.tensor([0.0, 0.4, 0.5, 0.75, 1.0, 1.0]))
    assert torch.allclose(optimality(advantages, 2.5), torch.tensor([0.0, 0.3, 0.5, 1.0, 1.0, 1.0]))


def test_forward_point_interpolates_clean_sample_and_noise_per_sample():
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([0.25, 1.0])
    x_t = forward_point(x0, eps, t)
    assert torch.allclose(x_t[0], 0.75 * x0[0] + 0.25 * eps[0]) and torch.equal(x_t[1], eps[1])


def test_adaptive_loss_is_the_squared_error_over_the_detached_absolute_error():
    x0 = torch.zeros(2, 4, 3, 3)
    estimate = torch.full((2, 4, 3, 3), 2.0, requires_grad=True)
    loss = adaptive_x0_loss(estimate, x0)
    assert torch.allclose(loss, torch.tensor([2.0, 2.0]))  # 4 / 2
    loss.sum().backward()
    # d/de of e^2 / sg(|e|) = 2e / 2 per element, averaged over 36 elements
    assert torch.allclose(estimate.grad, torch.full_like(estimate, 2 * 2.0 / 2.0 / 36))
    exact = adaptive_x0_loss(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3))
    assert exact.item() == 0.0  # the weight's floor keeps a perfect estimate finite


def test_loss_weights_the_positive_and_negative_policies_by_r():
    g = torch.Generator().manual_seed(0)
    x0, eps, v_theta, v_old = (torch.randn(3, 4, 3, 3, generator=g) for _ in range(4))
    t, r, beta = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([1.0, 0.0, 0.3]), 0.5
    x_t = forward_point(x0, eps, t)
    terms = nft_loss(v_theta, v_old, x_t, x0, t, r, beta, 5.0)
    tt = t.view(-1, 1, 1, 1)
    positive = adaptive_x0_loss(x_t - tt * (beta * v_theta + (1 - beta) * v_old), x0)
    negative = adaptive_x0_loss(x_t - tt * ((1 + beta) * v_old - beta * v_theta), x0)
    expected = 5.0 * ((r * positive + (1 - r) * negative) / beta).mean()  # scaled by the advantage clip
    assert torch.allclose(terms.policy, expected) and torch.allclose(terms.loss, expected)
    assert terms.kl.item() == 0.0
    # r = 1 takes only the positive policy's loss, r = 0 only the negative one's
    only = nft_loss(v_theta[:1], v_old[:1], x_t[:1], x0[:1], t[:1], r[:1], beta, 5.0)
    assert torch.allclose(only.policy, 5.0 * positive[0] / beta)
    only = nft_loss(v_theta[1:2], v_old[1:2], x_t[1:2], x0[1:2], t[1:2], r[1:2], beta, 5.0)
    assert torch.allclose(only.policy, 5.0 * negative[1] / beta)


def test_the_positive_policy_pulls_v_theta_toward_the_true_velocity_on_a_good_sample():
    x0, eps = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    t = torch.tensor([0.6])
    x_t = forward_point(x0, eps, t)
    true_v = eps - x0  # the velocity that maps x_t back to x0 exactly
    v_theta = (true_v + 0.3).requires_grad_(True)
    nft_loss(v_theta, true_v, x_t, x0, t, torch.ones(1), 1.0, 5.0).loss.backward()
    assert (v_theta.grad * 0.3).sum() > 0  # descending the gradient moves v_theta back toward true_v


def test_kl_term_is_the_mean_squared_velocity_gap_to_the_reference():
    v_theta, v_old, v_ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x0, t = torch.randn(2, 4, 3, 3), torch.tensor([0.5, 0.5])
    with_kl = nft_loss(v_theta, v_old, x0, x0, t, torch.ones(2), 1.0, 5.0, 1e-4, v_ref)
    expected = ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(with_kl.kl, expected)
    assert torch.allclose(with_kl.loss, with_kl.policy + 1e-4 * expected)


def test_old_policy_follows_with_the_repository_decay():
    assert old_policy_decay(0) == 0.0 and old_policy_decay(100) == pytest.approx(0.1)
    assert old_policy_decay(10_000) == 0.5
    old, current = {"a": torch.zeros(2)}, {"a": torch.ones(2)}
    assert torch.allclose(follow(old, current, 0.25)["a"], torch.full((2,), 0.75))


def _linear_velocity(channels: int, seed: int):
    """A velocity field that depends on x and sigma (so each sampler's steps give different results)."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.randn(channels, channels, generator=g) * 0.3, torch.randn(1, channels, 1, 1, generator=g)
    return lambda x, sigma: torch.einsum("oc,bchw->bohw", weight, x) + (1 - sigma) * bias


@pytest.mark.parametrize("steps", [10, 4])
def test_clean_samples_are_dpm_solver_2m_as_diffusers_steps_it(steps):
    """The repository samples with its "dpm2" solver: DPM-Solver++(2M), data prediction, first order at the first
    and the last step. diffusers' DPMSolverMultistepScheduler is an independent implementation of it."""
    from diffusers import DPMSolverMultistepScheduler

    sigmas = flow_sigmas(steps, {"shift": 3.0})  # from sigma 1, as UniPic2's scheduler
    velocity, noise = _linear_velocity(4, 1), torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    ours = sample_clean(velocity, noise, sigmas)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_order=2,
                                            algorithm_type="dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    scheduler.sigmas = sigmas.clone()
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity(x, sigmas[i].item()), timestep, x).prev_sample
        assert torch.allclose(ours.latents[i + 1], x, atol=1e-5), f"step {i}"
    assert ours.steps == [] and ours.log_probs.shape == (0, 2)
    euler = noise.clone()
    for i in range(steps):
        euler = euler_step(euler, velocity(euler, sigmas[i].item()), sigmas[i].item(), sigmas[i + 1].item())
    assert (ours.final - euler).abs().max() > 1e-3  # a second-order solver, not Euler
