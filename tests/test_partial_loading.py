"""The pack's own modules on small GPUs: Qwen2.5-VL, the MetaQuery conditioner and the SD3 text encoders under
ComfyUI's partial loading (and the MLLM with fp8 storage) compute what the plain transformers / diffusers modules
compute, i.e. the official recipe."""

import contextlib

import pytest
import torch

from unipic_core.metaquery import answer_question, encode_metaquery, query_hidden_states, query_inputs, yes_probability

from conftest import loaded_with_budget, offloaded_modules

MQ = "UniPic2-tiny-MetaQuery"
INSIDE = "(inside the checkpoint)"
PROMPTS = ["make it snow", "blurry"]


def picture(seed=0):
    return torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(seed))


def load(host, mllm_weights="default"):
    return host.node("LoadUniPic2MetaQuery").load(MQ, INSIDE, "fp32", mllm_weights)[1]


def outputs(encoder):
    """Query hidden states and the conditioner's tokens and pooled embedding of an edit prompt pair."""
    hidden = query_hidden_states(encoder, query_inputs(encoder, PROMPTS, [picture()]))
    embeds = encode_metaquery(encoder, PROMPTS, [picture()])
    return hidden, embeds.tokens, embeds.pooled


def largest_difference(ours, reference) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference))


@pytest.fixture(scope="module")
def reference(tiny_metaquery):
    """Today's implementation: the transformers and diffusers modules as loaded, untouched."""
    return outputs(tiny_metaquery.mllm)


def test_fully_and_partially_loaded_mllm_and_conditioner_equal_the_plain_modules(host, reference):
    mllm = load(host)
    with loaded_with_budget(mllm.mllm_patcher, None), loaded_with_budget(mllm.conditioner_patcher, None):
        assert offloaded_modules(mllm.mllm_patcher) == offloaded_modules(mllm.conditioner_patcher) == 0
        assert largest_difference(outputs(mllm.encoder), reference) <= 1e-5
    # the tiny conditioner's size is mostly its meta queries (loaded whole): its layers need a smaller budget to spill
    with loaded_with_budget(mllm.mllm_patcher, 0.3), loaded_with_budget(mllm.conditioner_patcher, 0.05):
        for patcher in (mllm.mllm_patcher, mllm.conditioner_patcher):
            assert offloaded_modules(patcher) > 0
            assert patcher.model.model_loaded_weight_memory < 0.5 * patcher.model_size()
        assert largest_difference(outputs(mllm.encoder), reference) <= 1e-5


def test_understand_and_judge_under_a_partial_load_equal_a_full_load(host, tiny_metaquery):
    mllm = load(host)
    question = "Is there snow?"
    expected = (answer_question(tiny_metaquery.mllm, [picture()], question, max_new_tokens=8),
                yes_probability(tiny_metaquery.mllm, [picture()], question))
    with loaded_with_budget(mllm.mllm_patcher, 0.3):
        assert offloaded_modules(mllm.mllm_patcher) > 0
        answer = answer_question(mllm.encoder, [picture()], question, max_new_tokens=8)
        probability = yes_probability(mllm.encoder, [picture()], question)
    assert answer == expected[0]
    assert abs(probability - expected[1]) <= 1e-6


def test_fp8_storage_quarters_the_linear_weights_and_stays_close(host, reference):
    full_size = load(host).mllm_patcher.model_size()
    mllm = load(host, "fp8_e4m3fn")
    linears = [m for m in mllm.encoder.mllm.modules() if isinstance(m, torch.nn.Linear)]
    stored = {m.weight.dtype for m in linears if m is not mllm.encoder.mllm.lm_head}
    assert stored == {torch.float8_e4m3fn} and mllm.encoder.mllm.lm_head.weight.dtype == torch.float32
    assert all(m.comfy_cast_weights and m.weight_scale is not None for m in linears if m.weight.dtype in stored)
    assert mllm.mllm_patcher.model_size() < full_size
    for fraction in (None, 0.3):
        with loaded_with_budget(mllm.mllm_patcher, fraction), loaded_with_budget(mllm.conditioner_patcher, None):
            ours = outputs(mllm.encoder)
        # fp8 e4m3 keeps 3 mantissa bits; measured on the tiny model: 2.5-4.5% of each output's largest value
        for out, ref in zip(ours, reference):
            assert 0 < (out - ref).abs().max() <= 0.06 * ref.abs().max()


def test_partially_loaded_text_encoders_equal_a_full_load(host, loaded):
    from unipic_core.text_encoding import encode_prompts

    text = loaded[1]
    with contextlib.ExitStack() as stack:
        for patcher in text.patchers:
            stack.enter_context(loaded_with_budget(patcher, None))
        full = encode_prompts(text.encoders, PROMPTS)
    with contextlib.ExitStack() as stack:
        for patcher in text.patchers:
            stack.enter_context(loaded_with_budget(patcher, 0.3))
            assert offloaded_modules(patcher) > 0
        partial = encode_prompts(text.encoders, PROMPTS)
    assert largest_difference((partial.tokens, partial.pooled), (full.tokens, full.pooled)) <= 1e-6
