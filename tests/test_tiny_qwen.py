"""The tiny Qwen2.5-VL folder loads and runs through the same transformers calls as Qwen/Qwen2.5-VL-7B-Instruct."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

HIDDEN = 256  # not the default, so the test sees the argument reach the text model
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Make the sky red."}]}]
# 512x352 shrunk to exactly 16x11 merged 28 px tokens = a 32x22 grid of 14 px patches.
PIXELS = int(352 * 28 / 32 * 512 * 28 / 32)


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    from unipic_core.tiny_qwen import write_qwen25vl_folder

    return write_qwen25vl_folder(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-tiny", hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def model(tiny_qwen_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_qwen_dir):
    return AutoProcessor.from_pretrained(tiny_qwen_dir)


@pytest.fixture(scope="module")
def image_inputs(processor):
    text = processor.apply_chat_template(IMAGE_TURN, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (512, 352), (200, 40, 90))
    return processor(text=[text], images=[image], size={"shortest_edge": PIXELS, "longest_edge": PIXELS},
                     return_tensors="pt")


def test_folder_has_the_official_layout(tiny_qwen_dir):
    assert sorted(p.name for p in tiny_qwen_dir.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]


def test_model_loads_every_weight_with_the_requested_text_width(tiny_qwen_dir):
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert model.config.text_config.hidden_size == HIDDEN
    assert model.config.vision_config.out_hidden_size == HIDDEN
    head_dim = HIDDEN // model.config.text_config.num_attention_heads
    assert sum(model.config.text_config.rope_parameters["mrope_section"]) == head_dim // 2


def test_config_token_ids_match_the_tokenizer(model, processor):
    ids = processor.tokenizer.convert_tokens_to_ids
    assert model.config.image_token_id == ids("<|image_pad|>") == processor.image_token_id
    assert model.config.video_token_id == ids("<|video_pad|>")
    assert model.config.vision_start_token_id == ids("<|vision_start|>")
    assert model.config.vision_end_token_id == ids("<|vision_end|>")
    assert processor.tokenizer.eos_token_id == ids("<|im_end|>")
    assert processor.tokenizer.pad_token_id == model.generation_config.pad_token_id == ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]


def test_writing_is_deterministic_for_a_seed(tmp_path, tiny_qwen_dir):
    from unipic_core.tiny_qwen import write_qwen25vl_folder

    again = write_qwen25vl_folder(tmp_path / "again", hidden_size=HIDDEN)
    assert (again / "model.safetensors").read_bytes() == (tiny_qwen_dir / "model.safetensors").read_bytes()


def test_byte_level_tokenizer_round_trips_any_text(processor):
    text = "Café <|im_start|>ünïcode 🙂"
    ids = processor.tokenizer(text).input_ids
    assert processor.tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert processor.tokenizer.decode(ids) == text


def test_chat_template_matches_qwen_format(processor):
    assert isinstance(processor, Qwen2_5_VLProcessor)
    text = processor.apply_chat_template(IMAGE_TURN, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Make the sky red.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_keeps_a_given_system_turn_and_string_content(processor):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_image_expands_to_one_pad_token_per_merged_patch(processor, image_inputs):
    assert image_inputs["image_grid_thw"].tolist() == [[1, 22, 32]]
    assert image_inputs["pixel_values"].shape == (22 * 32, 3 * 2 * 14 * 14)
    text = processor.tokenizer.decode(image_inputs["input_ids"][0])
    assert text.count("<|image_pad|>") == 22 * 32 // 4 == 176


@torch.no_grad()
def test_forward_gives_hidden_states_for_every_token(model, image_inputs):
    out = model.model(**image_inputs)
    assert out.last_hidden_state.shape == (1, image_inputs["input_ids"].shape[1], HIDDEN)
    assert torch.isfinite(out.last_hidden_state).all()


def test_generate_appends_new_tokens(model, image_inputs):
    prompt = image_inputs["input_ids"]
    out = model.generate(**image_inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    assert 1 <= out.shape[1] - prompt.shape[1] <= 5
