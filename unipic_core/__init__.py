"""The UniPic2 engine: models, checkpoint loading, sampling and images, usable without ComfyUI.

Modules: kontext_transformer (the DiT), loading (official folders, strict keys), text_encoding (SD3 prompts),
schedule and sampling (flow matching, Euler and Flow-GRPO SDE), images (VAE, sizes, previews), tiny (test
checkpoints), repos (official hub ids). Import the module you need; nothing heavy is imported here.
"""
