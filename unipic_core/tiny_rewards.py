"""Tiny random-weight reward models in their published layouts, for tests and CI.

- A CLIP reward folder as yuvalkirstain/PickScore_v1 and openai/clip-vit-large-patch14 publish it: config.json and
  model.safetensors of a transformers CLIPModel, with preprocessor_config.json and the tokenizer files beside them.
  The architecture keeps the published 224 px input and 14 px patches; widths and depths shrink.
- An OWLv2 detector folder as google/owlv2-base-patch16-ensemble publishes it: config.json and model.safetensors of a
  transformers Owlv2ForObjectDetection, preprocessor_config.json (its 960 px square input) and the CLIP tokenizer
  files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; "!" pads, 16 tokens per query). The
  960 px input and 16 px patches are kept; widths and depths shrink, and the text context grows to 64 tokens because
  the tiny tokenizer spends one token per character.
- The improved aesthetic predictor's MLP file: a torch state dict with its key names (layers.0/2/4/6/7), its
  hidden widths (1024, 128, 64, 16) and a narrower input (the CLIP's projection width).
- An EditScore adapter folder as PeftModel.save_pretrained writes it (adapter_config.json, adapter_model.safetensors,
  README.md), for a tiny Qwen2.5-VL of tiny_qwen.py: LoRA on the attention and MLP projections of the language model
  (and, peft matching by name, the vision blocks' MLPs), with random non-zero lora_B so it changes the answers.

Test fixtures kept in the engine rather than in tests/, because `python -m unipic_core.tiny` and the demo
(tools/demo.py) write these folders too.
"""

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, Owlv2Config, Owlv2ForObjectDetection

from .models.repos import QWEN_REPO
from .rewards.reward_models import AestheticMLP
from .tiny import write_clip_tokenizer

IMAGE_SIZE, PATCH_SIZE = 224, 14
# preprocessor_config.json of openai/clip-vit-large-patch14 (the older format with plain sizes).
PREPROCESSOR_CONFIG = {
    "crop_size": IMAGE_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": IMAGE_SIZE,
}


def write_clip_processor(folder: Path) -> dict[str, int]:
    """preprocessor_config.json and a byte-level tokenizer in `folder`; returns the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return write_clip_tokenizer(folder)


def write_clip_reward_folder(out: str | Path, projection_dim: int = 16, width: int = 32, seed: int = 0) -> Path:
    """A random-weight CLIPModel folder with its processor files; returns its path."""
    out = Path(out)
    torch.manual_seed(seed)
    vocab = write_clip_processor(out)
    end = vocab["<|endoftext|>"]
    layers = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
                  hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=end, pad_token_id=end, **layers),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **layers),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(str(out))
    return out


def write_aesthetic_mlp(path: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """A random-weight aesthetic MLP saved as the published .pth (torch.save of its state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(AestheticMLP(embed_dim).state_dict(), str(path))
    return path


EDITSCORE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_editscore_adapter(out: str | Path, qwen_folder: str | Path, rank: int = 4, alpha: float = 8.0,
                            seed: int = 0) -> Path:
    """A random LoRA for the Qwen2.5-VL in `qwen_folder`, saved by peft in its adapter layout; returns its path."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_folder), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=EDITSCORE_TARGETS,
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                param.normal_(std=0.05)
    peft_model.peft_config["default"].base_model_name_or_path = QWEN_REPO
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # no hub lookup of the base model's config
    return out


OWLV2_IMAGE_SIZE, OWLV2_PATCH_SIZE, OWLV2_TINY_CONTEXT = 960, 16, 64
# preprocessor_config.json of google/owlv2-base-patch16-ensemble
OWLV2_PREPROCESSOR_CONFIG = {
    "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "Owlv2ImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "Owlv2Processor", "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": OWLV2_IMAGE_SIZE, "width": OWLV2_IMAGE_SIZE},
}
OWLV2_SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                        "unk_token": "<|endoftext|>"}


def write_owlv2_folder(out: str | Path, width: int = 32, seed: int = 0) -> Path:
    """A random-weight Owlv2ForObjectDetection folder with its processor files; returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # "!" is id 0, as in OWLv2's vocabulary, where it pads queries
    vocab = write_clip_tokenizer(out, OWLV2_TINY_CONTEXT, **OWLV2_SPECIAL_TOKENS)
    (out / "special_tokens_map.json").write_text(json.dumps(OWLV2_SPECIAL_TOKENS, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(OWLV2_PREPROCESSOR_CONFIG, indent=2))
    layers = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=OWLV2_TINY_CONTEXT, pad_token_id=vocab["!"],
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], **layers),
        vision_config=dict(image_size=OWLV2_IMAGE_SIZE, patch_size=OWLV2_PATCH_SIZE, **layers),
        projection_dim=width,  # the class head compares box embeddings (vision width) with projected queries
    )
    model = Owlv2ForObjectDetection(config)
    # Random heads put every box on the image border and every score at 0 or 1; damped, boxes stay near their
    # patches and scores spread around 0.5, so thresholds, suppression and the rules see varied detections.
    with torch.no_grad():
        for layer in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.mul_(0.01)
            layer.bias.zero_()
    model.save_pretrained(str(out))
    return out
