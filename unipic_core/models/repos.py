"""Official checkpoints on the Hugging Face hub (and the aesthetic predictor on GitHub): UniPic 2.0's and the
learned rewards'."""

KONTEXT_REPOS = ("Skywork/UniPic2-SD3.5M-Kontext-2B", "Skywork/UniPic2-SD3.5M-Kontext-GRPO-2B")
KONTEXT_TRANSFORMER_CLASS = "SD3Transformer2DKontextModel"  # `_class_name` in their transformer/config.json
CONDITIONER_CLASS = "StableDiffusion3Conditioner"  # `_class_name` in their conditioner/config.json
METAQUERY_REPOS = ("Skywork/UniPic2-Metaquery-9B", "Skywork/UniPic2-Metaquery-GRPO-9B")
QWEN_REPO = "Qwen/Qwen2.5-VL-7B-Instruct"

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor PickScore's model card loads
CLIP_L14_REPO = "openai/clip-vit-large-patch14"
OWLV2_REPO = "google/owlv2-base-patch16-ensemble"  # the object reward's detector
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CHOICE = f"christophschuhmann/improved-aesthetic-predictor/{AESTHETIC_FILE}"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")
PROCESSOR_FILES = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
# What a CLIP reward folder needs from the hub: the repos also hold .bin, TensorFlow and Flax copies of the weights.
CLIP_FILES = ("config.json", "model.safetensors", *PROCESSOR_FILES)
# EditScore's reward model: a peft LoRA for QWEN_REPO (their scripts: --lora_path EditScore/EditScore-7B)
EDITSCORE_REPO = "EditScore/EditScore-7B"
EDITSCORE_FILES = ("adapter_config.json", "adapter_model.safetensors")
# OWLv2's: its weights as safetensors (not the .bin copy) and its processor files.
OWLV2_FILES = ("config.json", "model.safetensors", "added_tokens.json", *PROCESSOR_FILES)


def published_name(choice: str) -> str:
    """The name a published model (a repo id, or the aesthetic MLP's choice) is kept under in a models folder: its
    last part. The reward nodes download to it and torchrun's rewards read from it."""
    return choice.split("/")[-1]
