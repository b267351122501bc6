"""The UniPic2 engine: models, checkpoint loading, sampling and images, training and rewards, usable without ComfyUI.

Packages by stage: models (the networks, their files and loading), inference (images, latents, schedule, sampling:
IMAGE -> LATENT -> IMAGE), training (the GRPO / DiffusionNFT loop and its pieces), rewards (the Reward type and
rule-based rewards, learned reward models, EditScore, the object reward). Beside them: atomic_files (never half
written files) and tiny, tiny_qwen, tiny_rewards (random-weight test checkpoints in the official layouts). Import the
module you need; nothing heavy is imported here.
"""
