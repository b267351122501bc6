"""The MetaQuery recipe on the tiny model: template, queries, image tokens, positions, conditioner, errors."""

import shutil

import pytest
import torch

from unipic_core.models.metaquery import (answer_question, encode_metaquery, query_chat_text, query_hidden_states,
                                          query_inputs)

NUM_QUERIES = 256


def image(width, height, seed=0):
    return torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def captured(tiny_metaquery):
    """The keyword inputs the Qwen2.5-VL language model receives."""
    calls = []
    handle = tiny_metaquery.mllm.mllm.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    yield calls
    handle.remove()


def test_chat_text_has_no_system_turn_and_ends_with_the_generation_prompt(tiny_metaquery):
    processor = tiny_metaquery.mllm.processor
    t2i = query_chat_text(processor, "a red fox", 0)
    assert t2i == "<|im_start|>user\nGenerate an image: a red fox<|im_end|>\n<|im_start|>assistant\n"
    edit = query_chat_text(processor, "make it snow", 1)
    assert edit == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make it snow<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # the processor's own template does add the default system turn: we removed it
    assert "system" in processor.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_last_positions_carry_the_meta_queries(tiny_metaquery, captured):
    encoder = tiny_metaquery.mllm
    inputs = query_inputs(encoder, ["a red fox"], [])
    assert torch.equal(inputs["input_ids"][0, -NUM_QUERIES:], torch.zeros(NUM_QUERIES, dtype=torch.long))
    assert inputs["attention_mask"].all()
    query_hidden_states(encoder, inputs)
    embeds = captured[-1]["inputs_embeds"][0]
    assert torch.equal(embeds[-NUM_QUERIES:], encoder.conditioner.meta_queries)
    token_embeds = encoder.mllm.get_input_embeddings()(inputs["input_ids"][0, :-NUM_QUERIES])
    assert torch.equal(embeds[:-NUM_QUERIES], token_embeds)


def test_positions_are_one_dimensional_as_in_the_official_scripts(tiny_metaquery, captured):
    encoder = tiny_metaquery.mllm
    inputs = query_inputs(encoder, ["make it snow"], [image(128, 96)])
    query_hidden_states(encoder, inputs)
    positions = captured[-1]["position_ids"]
    length = inputs["input_ids"].shape[1]
    assert positions.shape[-1] == length
    assert torch.equal(positions.reshape(-1, length)[-3:], torch.arange(length).expand(3, -1))


@pytest.mark.parametrize("sizes", [[(512, 352)], [(128, 96), (64, 192)]])
def test_each_image_gets_one_vision_token_per_32px_patch(tiny_metaquery, captured, sizes):
    encoder = tiny_metaquery.mllm
    pictures = [image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    inputs = query_inputs(encoder, ["make it snow"], pictures)
    image_token = encoder.mllm.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum() == sum(w * h // 32**2 for w, h in sizes)
    assert inputs["image_grid_thw"].tolist() == [[1, h // 16, w // 16] for w, h in sizes]
    query_hidden_states(encoder, inputs)
    slots = inputs["input_ids"][0] == image_token
    vision = torch.cat(encoder.mllm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
                       .pooler_output)
    assert torch.equal(captured[-1]["inputs_embeds"][0, slots], vision)


def test_encoding_shapes_pooled_and_determinism(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    first = encode_metaquery(encoder, ["a red fox", "blurry"])
    again = encode_metaquery(encoder, ["a red fox", "blurry"])  # rope_deltas from the last call must not leak
    dit = tiny_metaquery.transformer.config
    assert first.tokens.shape == (2, NUM_QUERIES, dit.joint_attention_dim)
    assert first.pooled.shape == (2, dit.pooled_projection_dim)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.pooled, again.pooled)
    hidden = query_hidden_states(encoder, query_inputs(encoder, ["a red fox"], []))
    conditioner = encoder.conditioner
    with torch.no_grad():
        connected = conditioner.connector(conditioner.projector_1(hidden)).last_hidden_state
        assert torch.allclose(first.pooled[0], conditioner.projector_2(connected.mean(1))[0], atol=1e-5)


def test_negative_prompt_takes_the_same_path(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    picture = [image(128, 96)]
    pair = encode_metaquery(encoder, ["make it snow", "blurry"], picture)
    negative_alone = encode_metaquery(encoder, ["blurry"], picture)
    assert torch.allclose(pair.tokens[1:], negative_alone.tokens, atol=1e-6)
    assert not torch.allclose(pair.tokens[0], pair.tokens[1])


def test_conditioning_with_an_image_differs_from_without(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    with_image = encode_metaquery(encoder, ["make it snow"], [image(128, 96)])
    other_image = encode_metaquery(encoder, ["make it snow"], [image(128, 96, seed=5)])
    without = encode_metaquery(encoder, ["make it snow"])
    assert (with_image.tokens - without.tokens).abs().max() > 1e-4
    assert (with_image.tokens - other_image.tokens).abs().max() > 1e-6


def test_understanding_answers_deterministically_per_seed(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    ask = lambda seed, sample: answer_question(encoder, [image(96, 64)], "What is this?", max_new_tokens=12,
                                               do_sample=sample, seed=seed)
    greedy = ask(0, False)
    assert greedy == ask(1, False)  # greedy ignores the seed (the tiny model may answer with blanks)
    assert ask(3, True) == ask(3, True)
    assert len({ask(s, True) for s in range(4)}) > 1  # sampling depends on the seed


# --- loading -------------------------------------------------------------------------------------------------

def test_external_qwen_folder_and_hidden_size_mismatch(tiny_metaquery_dir, tmp_path):
    from unipic_core.models.loading import CheckpointError, load_metaquery
    from unipic_core.tiny_qwen import write_qwen25vl_folder

    wide = write_qwen25vl_folder(tmp_path / "Qwen-wide", hidden_size=256)
    with pytest.raises(CheckpointError, match=r"hidden size 256 but the conditioner .* expects 128 \(llm_hidden_size\)"):
        load_metaquery(tiny_metaquery_dir, wide)
    fitting = write_qwen25vl_folder(tmp_path / "Qwen-fit", hidden_size=128)
    parts = load_metaquery(tiny_metaquery_dir, fitting)
    assert parts.mllm.mllm.config.text_config.hidden_size == 128


def test_qwen_folder_without_processor_files_is_named(tiny_metaquery_dir, tmp_path):
    from unipic_core.models.loading import CheckpointError, load_metaquery

    qwen = shutil.copytree(tiny_metaquery_dir / "Qwen2.5-VL-tiny", tmp_path / "Qwen-no-processor")
    (qwen / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no processor/tokenizer files"):
        load_metaquery(tiny_metaquery_dir, qwen)
    (qwen / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="Qwen-no-processor has no processor/tokenizer files"):
        load_metaquery(tiny_metaquery_dir, qwen)


def test_metaquery_folder_without_conditioner_is_named(tiny_metaquery_dir, tmp_path):
    from unipic_core.models.loading import CheckpointError, load_metaquery

    copy = shutil.copytree(tiny_metaquery_dir, tmp_path / "mq")
    shutil.rmtree(copy / "conditioner")
    with pytest.raises(CheckpointError, match=r"'conditioner/config.json' not found .* conditioner/"):
        load_metaquery(copy)


def test_a_batch_is_right_padded_before_the_queries_and_positions_skip_the_padding(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    inputs = query_inputs(encoder, ["a long prompt about a red fox in the snow", "blurry"], [])
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    short = int(mask[1, :-NUM_QUERIES].sum())
    longest = ids.shape[1] - NUM_QUERIES
    assert mask[0].all() and short < longest
    assert not mask[1, short:longest].any() and mask[1, longest:].all()
    assert (ids[1, short:longest] == encoder.processor.tokenizer.pad_token_id).all()
    expected = torch.cat([torch.arange(short), torch.ones(longest - short, dtype=torch.long),
                          torch.arange(short, short + NUM_QUERIES)])
    assert torch.equal(positions[:, 1], expected.expand(3, -1))


def test_stale_rope_deltas_from_an_earlier_call_do_not_shift_positions(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    clean = encode_metaquery(encoder, ["a red fox"])
    encoder.mllm.model.rope_deltas = torch.tensor([[37]])  # what a previous generate() call may leave behind
    assert torch.equal(encode_metaquery(encoder, ["a red fox"]).tokens, clean.tokens)
    assert encoder.mllm.model.visual is not None  # transformers 5.x keeps the vision tower under .model.visual
