"""The loss terms of one piece of an update (some rows of a sampled chunk), per algorithm, each carrying the
gradient of the current LoRA: Flow-GRPO's (and Flow-GRPO-Fast's) per trained sampler step, DiffusionNFT's per
forward-process training point."""

from typing import Iterator

import torch

from ..models.dit import TrainableDiT
from .grpo import LossTerms, grpo_loss, step_policy, step_rule
from .grpo_settings import GRPOSettings
from .nft import NFTTerms, forward_point, nft_loss, old_policy, optimality
from .training_plan import Chunk, step_generator
from .training_samples import StepInputs


def flow_grpo_terms(dit: TrainableDiT, settings: GRPOSettings, inputs: StepInputs, steps: list[int], chunk: Chunk,
                    rows: list[int], advantages: torch.Tensor) -> Iterator[LossTerms]:
    """Flow-GRPO's loss terms of a piece, one per trained step, under the current LoRA; the KL's reference is the
    DiT with the LoRA disabled. advantages [len(rows)]."""
    s, sigmas = settings, inputs.sigmas[chunk.group]
    rule = step_rule(s.algorithm)
    trajectory, velocity = chunk.trajectory.rows(rows), inputs.velocity(dit, chunk, len(rows))
    for j in steps:
        log_prob, mean = step_policy(velocity, trajectory, sigmas, j, s.noise_level, rule)
        ref_mean = None
        if s.beta > 0:
            with torch.no_grad(), dit.adapter_disabled():
                _, ref_mean = step_policy(velocity, trajectory, sigmas, j, s.noise_level, rule)
        yield grpo_loss(log_prob, trajectory.log_prob(j), advantages, s.clip_range, s.beta, mean, ref_mean,
                        rule.kl_scale(sigmas, j, s.noise_level))


def nft_terms(dit: TrainableDiT, old_adapter: dict[str, torch.Tensor], settings: GRPOSettings, inputs: StepInputs,
              points: int, chunk: Chunk, rows: list[int], advantages: torch.Tensor) -> Iterator[NFTTerms]:
    """DiffusionNFT's loss terms of a piece, one per training point: each image is noised at `points` of the
    sampler's timesteps (a random choice per image) with fresh noise. advantages [len(rows)]."""
    s, sigmas = settings, inputs.sigmas[chunk.group]
    x0 = chunk.trajectory.final[rows]
    velocity = inputs.velocity(dit, chunk, len(rows))
    order, noise = [], []
    for r in rows:
        g = step_generator(s.seed, inputs.step, chunk.indices[r], "nft")
        order.append(torch.randperm(len(sigmas) - 1, generator=g)[:points])
        noise.append(torch.randn((points, *x0.shape[1:]), generator=g))
    order, noise = torch.stack(order), torch.stack(noise, dim=1).to(x0.device)
    r = optimality(advantages, s.advantage_clip)
    for k in range(points):
        t = sigmas[order[:, k]].to(x0.device)
        x_t = forward_point(x0, noise[k], t)
        with torch.no_grad(), old_policy(dit, old_adapter):  # before v_theta: the swap must not touch its graph
            v_old = velocity(x_t, t)
        v_ref = None
        if s.nft_kl > 0:
            with torch.no_grad(), dit.adapter_disabled():
                v_ref = velocity(x_t, t)
        yield nft_loss(velocity(x_t, t), v_old, x_t, x0, t, r, s.nft_beta, s.advantage_clip, s.nft_kl, v_ref)
