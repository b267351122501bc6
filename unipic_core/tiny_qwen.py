"""Write a tiny random-weight Qwen2.5-VL-Instruct folder in the layout of `Qwen/Qwen2.5-VL-7B-Instruct`.

Tests and the demo build their checkpoints offline: this folder loads through the same
`Qwen2_5_VLForConditionalGeneration.from_pretrained` / `AutoProcessor.from_pretrained` calls as the real one, with
the real token format (chat turns, `<|vision_start|><|image_pad|>...<|vision_end|>`) and the real image
preprocessing (14 px patches, 2x2 merge), only with 2-layer towers and a byte-level vocabulary.
"""

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor

# In the real tokenizer's order; `<|endoftext|>` is Qwen's bos, pad and unk, `<|im_end|>` ends a chat turn.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_HEADS, TEXT_KV_HEADS = 4, 2
# Qwen2.5-VL-7B's preprocessor_config.json: 56x56 to 16384 merged 28x28 tokens per image, CLIP mean/std.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384

# Same output as Qwen2.5-VL's template for text and image turns (video parts are not rendered). Written with
# explicit '\n' literals so Jinja's whitespace handling cannot change the format.
CHAT_TEMPLATE = (
    "{%- if messages[0].role != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for part in message.content -%}"
    "{%- if part.type == 'image' or 'image' in part -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' -%}{{ part.text }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _mrope_section(head_dim: int) -> list[int]:
    """(temporal, height, width) split of the head_dim / 2 rotary frequencies, in the 7B's 16:24:24 proportions."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def write_tokenizer(out: Path) -> Qwen2Tokenizer:
    # Every byte is a token of its own, so any text encodes without merges. The specials are listed after the
    # bytes so their ids follow the real order instead of the order the tokenizer happens to register them in.
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()) + SPECIAL_TOKENS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=SPECIAL_TOKENS, model_max_length=131072)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def write_model(out: Path, tokenizer: Qwen2Tokenizer, hidden_size: int) -> None:
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)))
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=2, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                 mrope_section=_mrope_section(hidden_size // TEXT_HEADS)),
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        # window_size 112 px = 4 merged tokens a side, as in the 7B; the last block attends globally like its
        # fullatt_block_indexes do, so both attention paths run.
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=hidden_size,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                   eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    model.save_pretrained(str(out))


def write_qwen25vl_folder(out: str | Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """Write the folder to `out` and return its path; the text model's hidden size is exactly `hidden_size`.

    Files are saved by each component's own class rather than by `Qwen2_5_VLProcessor.save_pretrained`, which in
    transformers 5 folds the image and video processors into one processor_config.json; the 7B folder has
    preprocessor_config.json (the video processor falls back to it) and the chat template in its own file.
    """
    if hidden_size % (2 * TEXT_HEADS):
        raise ValueError(f"hidden_size must be a multiple of {2 * TEXT_HEADS} so each of the {TEXT_HEADS} heads has "
                         f"an even rotary dim, got {hidden_size}")
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(out)
    write_model(out, tokenizer, hidden_size)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
