"""Write a tiny random-weight Qwen2.5-VL-Instruct in the layouts of `Qwen/Qwen2.5-VL-7B-Instruct`: its folder, or
the single safetensors file ComfyUI users hold as Qwen-Image's text encoder.

Tests and the demo build their checkpoints offline: these load through the same calls as the real ones, with the
real token format (chat turns, `<|vision_start|><|image_pad|>...<|vision_end|>`) and the real image preprocessing
(14 px patches, 2x2 merge). The architecture is the 7B's (its head widths, rotary and window settings: see
qwen25vl.py) with fewer heads and layers; the vocabulary is byte-level unless the real Qwen2.5 tokenizer is given.
With the 7B's sizes (QWEN25VL_7B) the folder is a full-size stand-in for benchmarks: random bf16 weights written
shard by shard without building the model (unipic_core.random_weights); the byte-level tokenizer's ids all lie in
the 7B's vocabulary, so it reads the same token format.

Test fixtures kept in the engine rather than in tests/, because `python -m unipic_core.tiny`, the demo
(tools/demo.py) and the MetaQuery benchmark write these checkpoints too.
"""

import shutil
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2TokenizerFast, Qwen2VLImageProcessor
from transformers.initialization import no_init_weights

from .models.qwen25vl import (CHAT_TEMPLATE, GENERATION, MAX_PIXELS, MIN_PIXELS, TEXT_HEAD_DIM, VISION_HEAD_DIM,
                              published_key, qwen25vl_config)
from .random_weights import write_random_weights

# In the real tokenizer's order; `<|endoftext|>` is Qwen's bos, pad and unk, `<|im_end|>` ends a chat turn.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Vision: one head; 8 blocks, so block 7 attends globally as the 7B's fullatt_block_indexes say and 0-6 in windows.
VISION_DEPTH = 8
# Qwen/Qwen2.5-VL-7B-Instruct's config.json: qwen25vl_config's sizes, and its embedding rows (past the tokenizer's).
QWEN25VL_7B = dict(hidden=3584, intermediate=18944, layers=28, kv_heads=4, vision_hidden=1280,
                   vision_intermediate=3420, vision_depth=32)
QWEN25VL_7B_VOCAB = 152064


def write_tokenizer(out: Path):
    # Every byte is a token of its own, so any text encodes without merges. The specials are listed after the
    # bytes so their ids follow the real order instead of the order the tokenizer happens to register them in.
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()) + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=SPECIAL_TOKENS, model_max_length=131072)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def write_model(out: Path, tokenizer, hidden_size: int, full_size: bool) -> None:
    if full_size:
        config = qwen25vl_config(tokenizer, **QWEN25VL_7B)
        config.text_config.vocab_size = QWEN25VL_7B_VOCAB
        with no_init_weights(), torch.device("meta"):  # shapes only: the weights are written shard by shard
            model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        config = qwen25vl_config(tokenizer, hidden=hidden_size, intermediate=2 * hidden_size, layers=2, kv_heads=1,
                                 vision_hidden=VISION_HEAD_DIM, vision_intermediate=2 * VISION_HEAD_DIM,
                                 vision_depth=VISION_DEPTH)
        model = Qwen2_5_VLForConditionalGeneration(config)
    text = config.text_config
    model.generation_config.update(**GENERATION, bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id,
                                   eos_token_id=[text.eos_token_id, text.pad_token_id])
    if full_size:
        config.save_pretrained(str(out))
        model.generation_config.save_pretrained(str(out))
        write_random_weights(model, out, "model", rename=published_key)
    else:
        model.save_pretrained(str(out))


def write_qwen25vl_folder(out: str | Path, hidden_size: int = TEXT_HEAD_DIM, seed: int = 0,
                          tokenizer_folder: str | Path | None = None, full_size: bool = False) -> Path:
    """Write the folder to `out` and return its path; the text model's hidden size is exactly `hidden_size` (a
    multiple of the 7B's head width, 128). tokenizer_folder: a Qwen2.5 tokenizer to use (e.g. ComfyUI's
    comfy/text_encoders/qwen25_tokenizer) instead of the byte-level one. full_size: the 7B's sizes (hidden_size
    ignored), random bf16 weights in shards, as published (~16.6 GB).

    Files are saved by each component's own class rather than by `Qwen2_5_VLProcessor.save_pretrained`, which in
    transformers 5 folds the image and video processors into one processor_config.json; the 7B folder has
    preprocessor_config.json (the video processor falls back to it) and the chat template in its own file.
    """
    if hidden_size % TEXT_HEAD_DIM:
        raise ValueError(f"hidden_size must be a multiple of {TEXT_HEAD_DIM} (Qwen2.5-VL's head width), got "
                         f"{hidden_size}")
    out = Path(out)
    torch.manual_seed(seed)
    if tokenizer_folder is None:
        tokenizer = write_tokenizer(out)
    else:
        tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_folder))
        tokenizer.save_pretrained(str(out))
    write_model(out, tokenizer, hidden_size, full_size)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def write_qwen25vl_file(path: str | Path, folder: str | Path) -> Path:
    """The weights of a tiny Qwen2.5-VL folder as one file in the text_encoders layout (the published keys, as the
    folder stores them); pair it with a folder written with the real tokenizer, which the file's loader uses."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(folder) / "model.safetensors", path)
    return path
