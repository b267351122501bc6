"""Official UniPic 2.0 checkpoints on the Hugging Face hub."""

KONTEXT_REPOS = ("Skywork/UniPic2-SD3.5M-Kontext-2B", "Skywork/UniPic2-SD3.5M-Kontext-GRPO-2B")
KONTEXT_TRANSFORMER_CLASS = "SD3Transformer2DKontextModel"  # `_class_name` in their transformer/config.json
