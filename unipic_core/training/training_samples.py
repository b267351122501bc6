"""A training step's samples: the drawn prompts / edit pairs conditioned once (StepInputs), each chunk of images
sampled with its latents and log-probs, then scored by the reward."""

from dataclasses import dataclass

import torch

from ..inference.images import resize_image
from ..inference.latents import LatentSpace
from ..inference.sampling import GuidedVelocity, PromptEmbeds
from ..inference.schedule import flow_sigmas
from ..models.dit import TrainableDiT
from ..rewards import Reward
from .grpo import sample_trajectory, step_rule
from .grpo_settings import GRPOSettings
from .nft import old_policy, sample_clean
from .training_data import TrainingItem
from .training_models import TrainingModels
from .training_plan import Chunk, choose_items, stochastic_steps, step_generator, target_size


@dataclass
class StepInputs:
    """A step's K prompts / edit pairs with what every phase needs of them (lists are per group)."""

    step: int  # counted from 0
    items: list[TrainingItem]
    sizes: list[tuple[int, int]]  # (width, height) of the generated images
    sources: list[torch.Tensor | None]  # editing: the source IMAGE [1, H, W, 3] resized to that size
    positive: PromptEmbeds  # batch K
    negative: PromptEmbeds | None  # batch K or 1
    references: list[torch.Tensor | None]  # model-space latent [1, C, h, w] of the source (editing)
    sigmas: list[torch.Tensor]
    guidance: float  # CFG scale; 1 (no CFG) for diffusion-nft
    device: torch.device

    def velocity(self, dit: TrainableDiT, chunk: Chunk, batch: int | None = None) -> GuidedVelocity:
        """The guided velocity for a chunk's group, for `batch` images at once (default: the chunk's)."""
        def row(embeds):
            if embeds is None or len(embeds.tokens) == 1:
                return embeds
            return PromptEmbeds(embeds.tokens[chunk.group:chunk.group + 1], embeds.pooled[chunk.group:chunk.group + 1])

        return GuidedVelocity(dit, row(self.positive), row(self.negative), self.guidance,
                              self.references[chunk.group], batch or len(chunk.indices), self.device)


def prepare_inputs(models: TrainingModels, data: list[TrainingItem], settings: GRPOSettings, step: int) -> StepInputs:
    """Draw the step's items and condition them: prompt embeddings, resized sources and their latents, sigmas."""
    s = settings
    items = choose_items(data, s, step)
    sizes = [target_size(item, s.resolution) for item in items]
    sources = [None if item.source is None else resize_image(item.source[None], *size)
               for item, size in zip(items, sizes)]
    positive, negative = models.condition([item.prompt for item in items],
                                          [None if src is None else src[0] for src in sources])
    references = [None if src is None else models.encode_image(src) for src in sources]
    sigmas = [flow_sigmas(s.sampling_steps, models.scheduler_config, models.latents.image_tokens(width, height))
              for width, height in sizes]
    guidance = 1.0 if s.algorithm == "diffusion-nft" else s.guidance  # DiffusionNFT samples and trains without CFG
    return StepInputs(step, items, sizes, sources, positive, negative, references, sigmas, guidance, models.device)


def sample_chunks(dit: TrainableDiT, old_adapter: dict[str, torch.Tensor] | None, chunks: list[Chunk],
                  inputs: StepInputs, settings: GRPOSettings, latents: LatentSpace) -> None:
    """Sample each chunk's trajectory (chunk.trajectory) from its images' own generators; diffusion-nft samples
    clean images with its old policy and its own ODE sampler."""
    s = settings
    stochastic, clean = stochastic_steps(s, inputs.step), s.algorithm == "diffusion-nft"
    with old_policy(dit, old_adapter):
        for chunk in chunks:
            width, height = inputs.sizes[chunk.group]
            shape = latents.shape(width, height)
            noise, step_noise = [], []
            for index in chunk.indices:  # per-image generators: the same image whatever the rank split
                g = step_generator(s.seed, inputs.step, index)
                noise.append(torch.randn(shape, generator=g))
                if not clean:  # ODE samples need no step noise
                    step_noise.append(torch.randn((s.sampling_steps, *shape), generator=g))
            noise, velocity = torch.stack(noise).to(inputs.device), inputs.velocity(dit, chunk)
            sigmas = inputs.sigmas[chunk.group]
            if clean:
                chunk.trajectory = sample_clean(velocity, noise, sigmas)
            else:
                chunk.trajectory = sample_trajectory(velocity, noise, sigmas, s.noise_level,
                                                     torch.stack(step_noise, dim=1), step_rule(s.algorithm), stochastic)


def score_chunks(reward: Reward, chunks: list[Chunk], inputs: StepInputs) -> dict[str, torch.Tensor]:
    """This rank's scores of its decoded chunks (chunk.images), in image order: {name: [n]} plus 'total'."""
    local: dict[str, list[torch.Tensor]] = {}
    for chunk in chunks:
        count, source = len(chunk.indices), inputs.sources[chunk.group]
        sources = None if source is None else source.expand(count, -1, -1, -1)
        item = inputs.items[chunk.group]
        scores = reward.score(chunk.images, [item.prompt] * count, sources, [item.metadata] * count)
        scores["total"] = reward.total(scores)
        for name, value in scores.items():
            local.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in local.items()}
