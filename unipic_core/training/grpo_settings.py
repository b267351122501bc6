"""A GRPO run's settings and their check.

The field names key the settings a checkpoint records (training_state.check_resumable compares them) and name
grpo_torchrun's flags: renaming one would stop older runs from resuming as they were."""

from dataclasses import dataclass

from .grpo import ALGORITHMS

SIZE_MULTIPLE = 32


@dataclass
class GRPOSettings:
    """Defaults are the paper's / Flow-GRPO's (docs/architecture.md §6)."""

    steps: int = 100
    algorithm: str = "flow-grpo"
    sde_window: int = 3  # flow-grpo-fast's stochastic (and trained) steps per sample
    nft_beta: float = 1.0  # diffusion-nft's b: how far the implicit policies reach past the old one
    nft_kl: float = 1e-4  # diffusion-nft's weight of its velocity KL term (its repository's; beta is Flow-GRPO's)
    group_size: int = 16
    prompts_per_step: int = 1
    sampling_steps: int = 10
    noise_level: float = 0.7
    guidance: float = 3.5
    beta: float = 0.04
    learning_rate: float = 3e-4
    lora_rank: int = 32
    lora_alpha: float = 64.0
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    batch_std: bool = False
    timestep_fraction: float = 0.99
    resolution: int = 512
    micro_batch: int = 0  # images per DiT forward; 0 = a whole group
    gradient_checkpointing: bool = True  # in the update: much less activation memory, ~1/3 more compute
    grad_clip: float = 1.0
    updates_per_step: int = 2  # optimizer steps per batch of samples (Flow-GRPO: two per epoch)
    seed: int = 0
    negative_prompt: str = ""
    save_every: int = 0  # 0 = only at the end

    def check(self) -> None:
        problems = []
        if self.group_size < 2:
            problems.append(f"group_size is {self.group_size}; GRPO compares images within a group, use 2 or more")
        if self.steps < 1 or self.prompts_per_step < 1 or self.sampling_steps < 1:
            problems.append("steps, prompts_per_step and sampling_steps must be at least 1")
        if self.noise_level <= 0 and self.algorithm != "diffusion-nft":
            problems.append(f"noise_level is {self.noise_level}; GRPO needs a stochastic sampler, use e.g. 0.7")
        if self.resolution < 64 or self.resolution % SIZE_MULTIPLE:
            problems.append(f"resolution {self.resolution} must be a multiple of {SIZE_MULTIPLE}, at least 64")
        if self.updates_per_step < 1 or self.updates_per_step > self.group_size * self.prompts_per_step:
            problems.append(f"updates_per_step must be between 1 and the step's images "
                            f"({self.group_size * self.prompts_per_step})")
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm is {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.sde_window < 1:
            problems.append(f"sde_window is {self.sde_window}; flow-grpo-fast needs at least one stochastic step")
        if self.algorithm == "flow-grpo-fast" and not 1 <= self.sde_window <= max(self.sampling_steps // 2, 1):
            problems.append(f"sde_window is {self.sde_window}; flow-grpo-fast's window lies in the first half of the "
                            f"{self.sampling_steps} steps, so use 1 to {max(self.sampling_steps // 2, 1)}")
        if self.nft_beta <= 0 or self.nft_kl < 0:
            problems.append(f"nft_beta is {self.nft_beta} and nft_kl {self.nft_kl}; diffusion-nft needs a positive b "
                            "and a KL weight of 0 or more (its defaults: 1.0 and 1e-4)")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            problems.append("lora_rank must be at least 1 and lora_alpha positive")
        if problems:
            raise ValueError("GRPO settings: " + "; ".join(problems))
