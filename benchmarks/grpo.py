"""Benchmark (not a test): one GRPO training step, split into its phases, against generating the same images.

    python -m benchmarks.grpo [--sizes tiny mid] [--group-size 4] [--sampling-steps 4] [--resolution 256]
                              [--micro-batch 0] [--repeats 3] [--algorithms flow-grpo flow-grpo-fast]
                              [--sde-window 2] [--full-size] [--device cpu|cuda] [--no-gradient-checkpointing]
                              [--learning [--learning-rate 3e-2] [--steps 25] [--seeds 3]]

from the repository root, where `unipic_core` and the `benchmarks` package import.

For each config it runs a few training steps and prints, per phase (prepare, sampling, decoding, reward, update),
the time and peak memory of the fastest step, then the whole step against a reference run in the same process:
plain flow-sde generation of the same K * G images (sampling + decoding, no log-probs, no LoRA). The ratio is
what training costs over generating its samples. --full-size uses SD3.5-Medium's DiT and VAE with random weights
(speed does not depend on the weights), bf16 DiT on a GPU, random prompt embeddings in place of the text
encoders; the paper's setting is --resolution 512 --group-size 16 --sampling-steps 10. Each algorithm is run in
turn. --learning instead runs the learning test's setup (25 steps, brightness of a fixed pixel map of the latent,
seeds 0-2) per algorithm on each of --sizes' DiTs and prints the training time each needs to raise the reward by
0.15, its ratio to the first algorithm's, and the rise after 25 steps.
"""

import argparse
import contextlib
import tempfile
import time

import torch

from benchmarks.harness import PeakMemory, benchmark_parser, full_size_dit, measure, random_prompt_embeds, ratios
from unipic_core.inference.sampling import PromptEmbeds, sample
from unipic_core.inference.schedule import flow_sigmas
from unipic_core.models.dit import DiffusersDiT
from unipic_core.models.loading import load_kontext
from unipic_core.rewards import colour_reward, jpeg_reward
from unipic_core.tiny import SD3_VAE_CHANNELS, SD3_VAE_LAYERS, random_vae, write_kontext_folder
from unipic_core.training.grpo import ALGORITHMS
from unipic_core.training.grpo_settings import GRPOSettings
from unipic_core.training.grpo_trainer import GRPOTrainer
from unipic_core.training.training_data import TrainingItem
from unipic_core.training.training_models import TrainingModels, models_on_device, training_models

PROMPTS = [TrainingItem("a photo of a red apple on a wooden table")]


def full_size_models(device: torch.device) -> TrainingModels:
    transformer = full_size_dit(device)
    vae = random_vae(SD3_VAE_CHANNELS, SD3_VAE_LAYERS).to(device, transformer.dtype).eval()
    embeds = random_prompt_embeds(transformer.config, torch.Generator().manual_seed(0))
    condition = lambda prompts, sources: (PromptEmbeds(embeds[0].tokens.expand(len(prompts), -1, -1),
                                                       embeds[0].pooled.expand(len(prompts), -1)), embeds[1])
    dit = DiffusersDiT(transformer)
    return training_models(lambda: dit, lambda: vae, condition, {"shift": 3.0}, device, "SD3.5-M-random")


class Phases:
    """phase(name) context manager recording (seconds, peak MiB) per phase of the current step."""

    def __init__(self, device):
        self.device, self.steps = device, []

    def new_step(self):
        self.steps.append({})

    @contextlib.contextmanager
    def __call__(self, name):
        with PeakMemory(self.device) as memory:
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        self.steps[-1][name] = (seconds, memory.peak)


def bench(name: str, models: TrainingModels, settings: GRPOSettings, repeats: int) -> None:
    trainer = GRPOTrainer(models, jpeg_reward(), PROMPTS, settings)
    phases = Phases(models.device)
    try:
        for _ in range(repeats + 1):  # the first step warms up
            phases.new_step()
            trainer.train_step(phases)
        positive, negative = models.condition([PROMPTS[0].prompt], [None])
        side = settings.resolution
        noise = torch.randn(settings.group_size, *models.latents.shape(side, side)).to(models.device)
        sigmas = flow_sigmas(settings.sampling_steps, models.scheduler_config, models.latents.image_tokens(side, side))
        generator = torch.Generator().manual_seed(0)

        def generate():
            with torch.no_grad():
                latents = sample(trainer.dit, noise, sigmas, positive, negative, settings.guidance,
                                 sampler="flow-sde", noise_level=settings.noise_level, generator=generator)
                models.decode(latents)

        measure(generate, models.device)
        reference = [measure(generate, models.device) for _ in range(repeats)]
    finally:
        trainer.close()
    steps = phases.steps[1:]
    totals = [(sum(t for t, _ in s.values()), max(m for _, m in s.values())) for s in steps]
    best = min(range(len(steps)), key=lambda i: totals[i][0])
    print(f"{name}: G={settings.group_size} T={settings.sampling_steps} {settings.resolution}px, "
          f"micro_batch={settings.micro_batch or settings.group_size}")
    for phase, (seconds, mib) in steps[best].items():
        print(f"  {phase:>9} {seconds:8.3f} s {mib:9.1f} MiB")
    step = min(t for t, _ in totals), min(m for _, m in totals)
    generating = min(t for t, _ in reference), min(m for _, m in reference)
    print(f"  step {step[0]:.3f} s, peak {step[1]:.1f} MiB | generating the same images {generating[0]:.3f} s, "
          f"{generating[1]:.1f} MiB | ratio {ratios(step, generating, digits=2)}")


def learning(size: str, algorithms: list[str], sde_window: int, device: torch.device, learning_rate: float,
             steps: int, seeds: int, target: float = 0.15) -> None:
    """The learning test's setup per algorithm on the `size` checkpoint config: the training time until the
    brightness, averaged over 3 steps, first stands `target` above the first 3 steps' mean, and the rise (mean of the
    last 3 steps - of the first 3). As in the test, no algorithm has a KL term (beta and nft_kl 0), so none pays for
    a reference pass. The tiny DiT's step time is mostly Python overhead; the mid one's is compute, as on real models,
    so its time ratios are the ones that carry over."""
    def settings(algorithm: str, seed: int) -> GRPOSettings:
        return GRPOSettings(steps=steps, group_size=8, sampling_steps=4, resolution=64, lora_rank=8, lora_alpha=16,
                            learning_rate=learning_rate, beta=0.0, nft_kl=0.0, updates_per_step=1, noise_level=0.8,
                            seed=seed, algorithm=algorithm, sde_window=sde_window)

    for algorithm in algorithms:  # all checked before the first one spends its time
        settings(algorithm, 0).check()
    reached, missed = {}, {}
    print(f"learning on the {size} DiT: LoRA r=8 alpha=16, G=8, T=4, 64 px, lr {learning_rate:g}, no KL, CFG 3.5 "
          "(diffusion-nft: none)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_kontext_folder(f"{tmp}/{size}", size)
        for algorithm in algorithms:
            rises, times, reached_at, missed[algorithm] = [], [], [], False
            for seed in range(seeds):
                models = models_on_device(load_kontext(folder), folder, device)
                models.decode = lambda latents: torch.sigmoid(latents[:, :3].float()).movedim(1, -1)
                trainer = GRPOTrainer(models, colour_reward((1, 1, 1)), PROMPTS, settings(algorithm, seed))
                try:
                    history = trainer.run().history
                finally:
                    trainer.close()
                means = [h["rewards"]["brightness"][0] for h in history]
                elapsed = [h["elapsed"] for h in history]
                smooth = [sum(means[i - 2:i + 1]) / 3 for i in range(2, len(means))]
                rises.append(smooth[-1] - smooth[0])
                first = next((i for i, m in enumerate(smooth) if m - smooth[0] >= target), None)
                # a seed that never reaches the target counts its whole run: the mean becomes a lower bound
                times.append(sum(elapsed if first is None else elapsed[:first + 3]))
                reached_at.append(f">{steps}" if first is None else str(first + 3))
                missed[algorithm] |= first is None
            reached[algorithm] = sum(times) / len(times)
            ratio = reached[algorithm] / reached[algorithms[0]]
            # a miss makes that mean a lower bound: in the numerator the ratio is at least, in the denominator at most
            bound = {(False, False): "", (True, False): ">=", (False, True): "<="}.get(
                (missed[algorithm], missed[algorithms[0]]))
            bound = "n/a" if bound is None else f"{bound}{ratio:.2f}"
            print(f"{algorithm:>15}: +{target} reached after {', '.join(reached_at)} steps, "
                  f"{', '.join(f'{t:.1f}' for t in times)} s | time / {algorithms[0]} {bound} "
                  f"| rise over {steps} steps {', '.join(f'{r:.3f}' for r in rises)}")


def learning_steps(text: str) -> int:
    """--steps: the rise is judged on 3-step means, so fewer than 3 steps leave nothing to judge."""
    steps = int(text)
    if steps < 3:
        raise argparse.ArgumentTypeError(f"{steps} is too few: the rise is measured on means over 3 steps, give at "
                                         "least 3")
    return steps


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--sampling-steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true", help="SD3.5-M DiT + SD3 VAE, random weights")
    parser.add_argument("--algorithms", nargs="*", default=list(ALGORITHMS))
    parser.add_argument("--sde-window", type=int, default=2, help="flow-grpo-fast's window")
    parser.add_argument("--learning", action="store_true", help="compare reward rise and time per algorithm")
    parser.add_argument("--learning-rate", type=float, default=3e-2, help="with --learning (the test's: 3e-2)")
    parser.add_argument("--steps", type=learning_steps, default=25, help="with --learning (at least 3)")
    parser.add_argument("--seeds", type=int, default=3, help="with --learning")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="keep the DiT's activations in "
                        "the update (the trainer checkpoints by default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}")
    if args.learning:
        for size in args.sizes:
            learning(size, args.algorithms, args.sde_window, device, args.learning_rate, args.steps, args.seeds)
        return
    runs = {algorithm: GRPOSettings(group_size=args.group_size, sampling_steps=args.sampling_steps,
                                    resolution=args.resolution, micro_batch=args.micro_batch, algorithm=algorithm,
                                    sde_window=args.sde_window,
                                    gradient_checkpointing=not args.no_gradient_checkpointing)
            for algorithm in args.algorithms}
    for settings in runs.values():  # every algorithm's, before the first one spends its (device) time
        settings.check()
    print("LoRA r=32 alpha=64, beta=0.04, CFG 3.5 (diffusion-nft: none), fp32 SDE maths")
    for algorithm, settings in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                folder = write_kontext_folder(f"{tmp}/{size}", size)
                bench(f"{algorithm} {size}", models_on_device(load_kontext(folder), folder, device), settings,
                      args.repeats)
        if args.full_size:
            bench(f"{algorithm} SD3.5-M (random weights)", full_size_models(device), settings, args.repeats)


if __name__ == "__main__":
    main()
