"""Qwen2.5-VL from one safetensors file, as ComfyUI users hold it for Qwen-Image (models/text_encoders/
qwen_2.5_vl_7b*.safetensors): the published checkpoint's keys (`model.*` for the language model, `visual.*` for the
vision tower, `lm_head.*` when kept), no config and no tokenizer beside it.

The architecture is Qwen2.5-VL-7B-Instruct's: its sizes are read from the weights' shapes, everything the shapes
cannot show (head widths, rotary and window settings) is the published config's. The tokenizer is the Qwen2.5 one
(ComfyUI ships it), the image processor and chat template are the 7B's.
"""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5_VLProcessor, Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
from transformers.initialization import no_init_weights

from .fp8_weights import is_fp8, store_fp8
from .loading import CheckpointError, check_keys, check_safetensors_file

# Qwen/Qwen2.5-VL-7B-Instruct's config.json, for what a state dict does not show.
TEXT_HEAD_DIM, VISION_HEAD_DIM = 128, 80
TEXT_CONSTANTS = dict(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6, sliding_window=32768,
                      use_sliding_window=False, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                      mrope_section=[16, 24, 24]))
VISION_CONSTANTS = dict(hidden_act="silu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
# its generation_config.json (token ids come from the tokenizer)
GENERATION = dict(do_sample=True, repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1)
# its preprocessor_config.json: 56x56 to 16384 merged 28x28 tokens per image (CLIP mean and std are the default)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384
# Its chat template's output for text and image turns (video parts are not rendered). Explicit '\n' literals so
# Jinja's whitespace handling cannot change the format.
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
MARKER_KEYS = ("model.layers.0.self_attn.k_proj.bias", "visual.patch_embed.proj.weight")
OUTPUT_LAYER = "lm_head.weight"  # ComfyUI's text-encoder files may leave it out: encoding does not use it


class MissingOutputLayer(torch.nn.Module):
    """Stands in for the lm_head a file left out, so what needs it (answers, yes/no) fails with the reason."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def forward(self, hidden_states):
        raise CheckpointError(f"{self.path.name} has no output layer (lm_head), which Understand and the Judge "
                              "reward need (text-encoder files may leave it out). Load the MLLM from the "
                              "Qwen2.5-VL-7B-Instruct folder (models/LLM) for them; MetaQuery encoding works either way")


def qwen25vl_config(tokenizer, hidden: int, intermediate: int, layers: int, kv_heads: int, vision_hidden: int,
                    vision_intermediate: int, vision_depth: int) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of these sizes with the 7B's constants; token ids from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // TEXT_HEAD_DIM,
                         num_key_value_heads=kv_heads, bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                         tie_word_embeddings=False, **TEXT_CONSTANTS),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                           num_heads=vision_hidden // VISION_HEAD_DIM, out_hidden_size=hidden, **VISION_CONSTANTS),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def is_qwen25vl_file(path: Path) -> bool:
    """A safetensors file with Qwen2.5-VL's language model and vision tower in the published key layout."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception:  # not readable as safetensors: not ours to list
        return False
    return all(key in keys for key in MARKER_KEYS)


def count_blocks(shapes: dict, prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in shapes if key.startswith(prefix)})


def config_from_shapes(shapes: dict[str, torch.Size], tokenizer) -> Qwen2_5_VLConfig:
    embed = shapes["model.embed_tokens.weight"]
    if embed[0] < len(tokenizer):
        raise CheckpointError(f"the Qwen2.5-VL file has {embed[0]} token embeddings but the Qwen2.5 tokenizer has "
                              f"{len(tokenizer)} tokens; it is not a Qwen2.5-VL-Instruct checkpoint")
    config = qwen25vl_config(
        tokenizer, hidden=embed[1], intermediate=shapes["model.layers.0.mlp.gate_proj.weight"][0],
        layers=count_blocks(shapes, "model.layers."), kv_heads=shapes["model.layers.0.self_attn.k_proj.bias"][0] //
        TEXT_HEAD_DIM, vision_hidden=shapes["visual.patch_embed.proj.weight"][0],
        vision_intermediate=shapes["visual.blocks.0.mlp.gate_proj.weight"][0],
        vision_depth=count_blocks(shapes, "visual.blocks."))
    config.text_config.vocab_size = embed[0]  # the 7B pads its embedding past the tokenizer (152064 rows)
    return config


def model_key(file_key: str) -> str:
    """A published key -> transformers' module path (both towers under `model`, as from_pretrained maps them)."""
    if file_key.startswith("visual."):
        return "model." + file_key
    if file_key.startswith("model."):
        return "model.language_model." + file_key.removeprefix("model.")
    return file_key


def published_key(model_key: str) -> str:
    """model_key's inverse: transformers' module path -> the published checkpoint's key."""
    if model_key.startswith("model.visual."):
        return model_key.removeprefix("model.")
    if model_key.startswith("model.language_model."):
        return "model." + model_key.removeprefix("model.language_model.")
    return model_key


def model_tensors(state: dict[str, torch.Tensor], model: torch.nn.Module,
                  dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, float]]]:
    """The file's tensors under the model's keys in `dtype`, and apart the fp8 Linear weights with their scales
    (ComfyUI's "fp8_scaled" files: fp8 `.weight`s, each with a `.scale_weight`; their `.scale_input` activation
    hints and the `scaled_fp8` marker are not needed to dequantize). Other fp8 tensors are dequantized."""
    scales = {key.removesuffix(".scale_weight"): state.pop(key).item() for key in list(state)
              if key.endswith(".scale_weight")}
    tensors, fp8 = {}, {}
    for key, tensor in state.items():
        if key.endswith(".scale_input") or key == "scaled_fp8":
            continue
        name, layer = model_key(key), model_key(key.removesuffix(".weight"))
        scale = scales.get(key.removesuffix(".weight"), 1.0)
        if is_fp8(tensor) and key.endswith(".weight") and type(model.get_submodule(layer)) is torch.nn.Linear:
            fp8[layer] = tensor, scale
        elif is_fp8(tensor):
            tensors[name] = (tensor.float() * scale).to(dtype)
        else:
            tensors[name] = tensor.to(dtype)
    return tensors, fp8


def load_qwen25vl_file(path: Path, tokenizer_folder: Path, dtype: torch.dtype):
    """(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor) from one file, every weight checked. The model is
    built uninitialised and takes the file's tensors as they are, so loading costs about the file's size in RAM;
    fp8 Linear weights stay fp8 (unipic_core.models.fp8_weights)."""
    check_safetensors_file(path)
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_folder))
    state = load_file(str(path))
    try:
        config = config_from_shapes({key: tensor.shape for key, tensor in state.items()}, tokenizer)
    except KeyError as err:
        raise CheckpointError(f"{path}: no {err} weight; is it a Qwen2.5-VL file?") from err
    with no_init_weights():  # every weight comes from the file
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    tensors, fp8 = model_tensors(state, model, dtype)
    expected = {key for key in model.state_dict() if key != OUTPUT_LAYER or OUTPUT_LAYER in tensors}
    check_keys(path, expected, set(tensors) | {f"{name}.weight" for name in fp8}, "Qwen2.5-VL-7B-Instruct's layout")
    model.load_state_dict(tensors, strict=False, assign=True)
    for name, (values, scale) in fp8.items():
        store_fp8(model.get_submodule(name), values, scale)
    if OUTPUT_LAYER not in tensors:
        model.lm_head = MissingOutputLayer(path)
    model.generation_config = GenerationConfig(**GENERATION, bos_token_id=config.text_config.bos_token_id,
                                               pad_token_id=config.text_config.pad_token_id,
                                               eos_token_id=[config.text_config.eos_token_id,
                                                             config.text_config.pad_token_id])
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                                    tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    return model.eval().requires_grad_(False), processor
