"""Official UniPic 2.0 checkpoints on the Hugging Face hub."""

KONTEXT_REPOS = ("Skywork/UniPic2-SD3.5M-Kontext-2B", "Skywork/UniPic2-SD3.5M-Kontext-GRPO-2B")
KONTEXT_TRANSFORMER_CLASS = "SD3Transformer2DKontextModel"  # `_class_name` in their transformer/config.json
CONDITIONER_CLASS = "StableDiffusion3Conditioner"  # `_class_name` in their conditioner/config.json
METAQUERY_REPOS = ("Skywork/UniPic2-Metaquery-9B", "Skywork/UniPic2-Metaquery-GRPO-9B")
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
