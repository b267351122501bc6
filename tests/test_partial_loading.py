"""The pack's own modules on small GPUs: Qwen2.5-VL, the MetaQuery conditioner and the SD3 text encoders under
ComfyUI's partial loading (and the MLLM with fp8 storage) compute what the plain transformers / diffusers modules
compute, i.e. the official recipe.

On the CPU a partial load casts CPU weights to the CPU, so these tests check that the layers really run ComfyUI's
cast path (weights marked offloaded, the right outputs), not the transfer itself."""

import contextlib

import pytest
import torch

from unipic_core.models.metaquery import answer_question, yes_probability

from conftest import (METAQUERY_PROMPTS, edit_picture, largest_difference, loaded_with_budget, metaquery_outputs,
                      offloaded_modules)

MQ = "UniPic2-tiny-MetaQuery"
INSIDE = "(inside the checkpoint)"


def load(host, mllm_weights="default"):
    return host.node("LoadUniPic2MetaQuery").load(MQ, INSIDE, "fp32", mllm_weights)[1]


@pytest.fixture(scope="module")
def reference(tiny_metaquery):
    """Today's implementation: the transformers and diffusers modules as loaded, untouched."""
    return metaquery_outputs(tiny_metaquery.mllm)


def test_fully_and_partially_loaded_mllm_and_conditioner_equal_the_plain_modules(host, reference):
    mllm = load(host)
    with loaded_with_budget(mllm.mllm_patcher, None), loaded_with_budget(mllm.conditioner_patcher, None):
        assert offloaded_modules(mllm.mllm_patcher) == offloaded_modules(mllm.conditioner_patcher) == 0
        assert largest_difference(metaquery_outputs(mllm.encoder), reference) <= 1e-5
    # the tiny conditioner's size is mostly its meta queries (never moved by a partial load): its layers need a
    # smaller budget to spill
    with loaded_with_budget(mllm.mllm_patcher, 0.3), loaded_with_budget(mllm.conditioner_patcher, 0.05):
        for patcher in (mllm.mllm_patcher, mllm.conditioner_patcher):
            assert offloaded_modules(patcher) > 0
            assert patcher.model.model_loaded_weight_memory < 0.5 * patcher.model_size()
        assert largest_difference(metaquery_outputs(mllm.encoder), reference) <= 1e-5


def test_understand_and_judge_under_a_partial_load_equal_the_plain_modules(host, tiny_metaquery):
    mllm = load(host)
    question = "Is there snow?"

    def ask(encoder):
        return (answer_question(encoder, [edit_picture()], question, max_new_tokens=8, do_sample=True, seed=3),
                yes_probability(encoder, [edit_picture()], question))

    expected = ask(tiny_metaquery.mllm)
    assert expected[0].strip()  # sampled with a seed: a real answer to compare, not two empty strings
    with loaded_with_budget(mllm.mllm_patcher, 0.3):
        assert offloaded_modules(mllm.mllm_patcher) > 0
        answer, probability = ask(mllm.encoder)
    assert answer == expected[0]
    assert abs(probability - expected[1]) <= 1e-6


def test_the_mllm_reports_the_compute_device_whatever_stays_offloaded(host):
    """generate() sends its inputs to model.device, the first parameter's device: under a partial load that one may
    be left on the offload device, so the model must report where it computes."""
    mllm = load(host).encoder.mllm
    layer, name = next((m, n) for m in mllm.modules() for n, _ in m.named_parameters(recurse=False))
    stored = layer._parameters[name]
    layer._parameters[name] = torch.nn.Parameter(stored.to("meta"), requires_grad=False)  # as if left elsewhere
    try:
        assert next(mllm.parameters()).device.type == "meta"
        assert mllm.device == host.module("nodes.host.memory").device()
    finally:
        layer._parameters[name] = stored


def test_fp8_storage_quarters_the_linear_weights_and_stays_close(host, reference):
    full = load(host)
    full_bytes = {name: m.weight.nbytes for name, m in full.encoder.mllm.named_modules()
                  if isinstance(m, torch.nn.Linear)}
    mllm = load(host, "fp8_e4m3fn")
    head = mllm.encoder.mllm.lm_head
    linears = {name: m for name, m in mllm.encoder.mllm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert head.weight.dtype == torch.float32  # the output layer stays exact
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight.nbytes * 4 == full_bytes[name] and m.weight_scale > 0
               for name, m in linears.items() if m is not head)
    for fraction in (None, 0.3):
        with loaded_with_budget(mllm.mllm_patcher, fraction), loaded_with_budget(mllm.conditioner_patcher, None):
            assert (offloaded_modules(mllm.mllm_patcher) > 0) == (fraction is not None)
            ours = metaquery_outputs(mllm.encoder)
        # fp8 e4m3 keeps 3 mantissa bits; measured on the tiny model: 2.5-4.5% of each output's largest value
        for out, ref in zip(ours, reference):
            assert 0 < (out - ref).abs().max() <= 0.06 * ref.abs().max()


def test_partially_loaded_text_encoders_equal_a_full_load(host, loaded):
    from unipic_core.models.text_encoding import encode_prompts

    text = loaded[1]
    with contextlib.ExitStack() as stack:
        for patcher in text.patchers:
            stack.enter_context(loaded_with_budget(patcher, None))
        full = encode_prompts(text.encoders, METAQUERY_PROMPTS)
    with contextlib.ExitStack() as stack:
        for patcher in text.patchers:
            stack.enter_context(loaded_with_budget(patcher, 0.3))
            assert offloaded_modules(patcher) > 0
        partial = encode_prompts(text.encoders, METAQUERY_PROMPTS)
    assert largest_difference((partial.tokens, partial.pooled), (full.tokens, full.pooled)) <= 1e-6
