"""Reward-LoRA training: the algorithms' maths (grpo, nft), a run's settings, data and models, one step's plan,
samples and losses, the loop (grpo_trainer), its checkpoint files, data parallelism and the torchrun entry point
(grpo_torchrun), and the trainer node's curves."""
