"""Qwen2.5-VL from the single file ComfyUI users keep in models/text_encoders (Qwen-Image's text encoder): listed by
Load UniPic2 MetaQuery, read with the published config's architecture and ComfyUI's Qwen2.5 tokenizer, and equal to
the same weights loaded from a folder."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from unipic_core.models.metaquery import answer_question
from unipic_core.models.qwen25vl import config_from_shapes

from conftest import edit_picture, largest_difference, metaquery_outputs

MQ = "UniPic2-tiny-MetaQuery"
FOLDER = "Qwen2.5-VL-tiny-real-tokenizer"


@pytest.fixture(scope="module")
def qwen_files(host, tmp_path_factory):
    """A tiny Qwen2.5-VL with the real Qwen2.5 vocabulary as a folder (in an extra models/unipic2) and as single
    files in an extra models/text_encoders: complete, and without the output layer as ComfyUI's files may be."""
    import folder_paths

    from unipic_core.tiny_qwen import write_qwen25vl_file, write_qwen25vl_folder

    root = tmp_path_factory.mktemp("models")
    folder = write_qwen25vl_folder(root / "unipic2" / FOLDER, tokenizer_folder=host.module("nodes.host.folders")
                                   .qwen25_tokenizer_folder())
    file = write_qwen25vl_file(root / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", folder)
    state = load_file(str(file))
    del state["lm_head.weight"]
    save_file(state, str(root / "text_encoders" / "qwen_2.5_vl_tiny_no_head.safetensors"))
    save_file({"x": torch.zeros(1)}, str(root / "text_encoders" / "not_qwen.safetensors"))
    folder_paths.add_model_folder_path("unipic2", str(root / "unipic2"))
    folder_paths.add_model_folder_path("text_encoders", str(root / "text_encoders"))
    return root


def load(host, mllm):
    return host.node("LoadUniPic2MetaQuery").load(MQ, mllm, "fp32", "default")[1].encoder


def test_loader_lists_qwen_files_and_not_other_text_encoders(host, qwen_files):
    choices = host.nodes.NODE_CLASS_MAPPINGS["LoadUniPic2MetaQuery"].INPUT_TYPES()["required"]["mllm"][0]
    assert "text_encoders/qwen_2.5_vl_tiny.safetensors" in choices and FOLDER in choices
    assert "text_encoders/not_qwen.safetensors" not in choices


def test_the_single_file_gives_what_the_folder_gives(host, qwen_files):
    from_folder = load(host, FOLDER)
    expected = metaquery_outputs(from_folder), answer_question(from_folder, [edit_picture()], "What is it?", 6, do_sample=True)
    from_file = load(host, "text_encoders/qwen_2.5_vl_tiny.safetensors")
    assert len(from_file.processor.tokenizer) == len(from_folder.processor.tokenizer) > 150_000
    sampling = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "eos_token_id", "pad_token_id")
    assert ({k: getattr(from_file.mllm.generation_config, k) for k in sampling}
            == {k: getattr(from_folder.mllm.generation_config, k) for k in sampling})
    assert largest_difference(metaquery_outputs(from_file), expected[0]) <= 1e-5
    assert answer_question(from_file, [edit_picture()], "What is it?", 6, do_sample=True) == expected[1]


def test_a_file_without_the_output_layer_encodes_and_understand_names_what_is_missing(host, qwen_files):
    expected = metaquery_outputs(load(host, FOLDER))
    headless = load(host, "text_encoders/qwen_2.5_vl_tiny_no_head.safetensors")
    assert largest_difference(metaquery_outputs(headless), expected) <= 1e-5
    CheckpointError = host.module("unipic_core.models.loading").CheckpointError
    with pytest.raises(CheckpointError, match=r"no output layer \(lm_head\).*models/LLM"):
        answer_question(headless, [edit_picture()], "What is it?", 6)


def test_the_7b_file_shapes_give_the_published_config(host):
    """The real file's shapes (Qwen2.5-VL-7B-Instruct) -> its published config.json values."""
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast.from_pretrained(str(host.module("nodes.host.folders").qwen25_tokenizer_folder()))
    shapes = {"model.embed_tokens.weight": (152064, 3584), "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
              "model.layers.0.self_attn.k_proj.bias": (512,), "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
              "visual.blocks.0.mlp.gate_proj.weight": (3420, 1280)}
    shapes.update({f"model.layers.{i}.input_layernorm.weight": (3584,) for i in range(28)})
    shapes.update({f"visual.blocks.{i}.norm1.weight": (1280,) for i in range(32)})
    config = config_from_shapes({k: torch.Size(v) for k, v in shapes.items()}, tokenizer)
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (152064, 3584, 18944, 28)
    assert (text.num_attention_heads, text.num_key_value_heads, text.rope_parameters["mrope_section"]) == (28, 4, [16, 24, 24])
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.out_hidden_size, vision.fullatt_block_indexes, vision.window_size) == (3584, [7, 15, 23, 31], 112)
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (151655, 151656, 151652)
    assert not config.tie_word_embeddings


def test_an_fp8_scaled_file_keeps_fp8_weights_and_applies_their_scales(host, qwen_files, tiny_metaquery_dir):
    """ComfyUI's fp8_scaled layout: fp8 `.weight` + `.scale_weight` per Linear, a `scaled_fp8` marker, maybe
    `.scale_input`. It must compute exactly what the dequantized weights (q * scale) compute."""
    from unipic_core.models.fp8_weights import quantize_linears
    from unipic_core.models.loading import load_metaquery_encoder

    plain = load_file(str(qwen_files / "text_encoders" / "qwen_2.5_vl_tiny.safetensors"))
    scaled = dict(plain, scaled_fp8=torch.empty(0, dtype=torch.float8_e4m3fn))
    linears = [k for k in plain if k.endswith(("proj.weight", "qkv.weight", "mlp.0.weight", "mlp.2.weight"))
               and "patch_embed" not in k]  # the Linear layers, as in ComfyUI's file (the Conv3d stays bf16)
    for key in linears:
        layer = torch.nn.Linear(1, 1)
        layer.weight = torch.nn.Parameter(plain[key])
        quantize_linears(layer, torch.float8_e4m3fn)
        prefix = key.removesuffix(".weight")
        scaled.update({key: layer.weight.data, f"{prefix}.scale_weight": torch.tensor(layer.weight_scale),
                       f"{prefix}.scale_input": torch.ones(())})
        plain[key] = layer.weight.data.float() * layer.weight_scale  # what the fp8 file means
    save_file(scaled, str(qwen_files / "text_encoders" / "qwen_2.5_vl_tiny_fp8_scaled.safetensors"))
    save_file(plain, str(qwen_files / "dequantized.safetensors"))
    loaded = load(host, "text_encoders/qwen_2.5_vl_tiny_fp8_scaled.safetensors")
    q_proj = loaded.mllm.model.language_model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.float8_e4m3fn and q_proj.weight_scale not in (0, 1)
    reference = load_metaquery_encoder(tiny_metaquery_dir, qwen_files / "dequantized.safetensors", torch.float32,
                                       host.module("nodes.host.folders").qwen25_tokenizer_folder())
    assert largest_difference(metaquery_outputs(loaded), metaquery_outputs(reference)) <= 1e-5
