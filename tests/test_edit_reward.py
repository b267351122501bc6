"""EditScore: the published prompts, parser and formula; its peft adapter read strictly onto our Qwen2.5-VL; the
node's patched clone of the MetaQuery MLLM equal to peft's merged model, answering exactly as the published
pipeline does, with one copy of the weights."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from unipic_core.models.loading import CheckpointError
from unipic_core.models.qwen25vl_lora import read_qwen25vl_lora
from unipic_core.models.repos import EDITSCORE_REPO
from unipic_core.rewards.editscore import (chat_text, overall_score, parse_judgement, pq_prompt, reward_from_passes,
                                           sc_prompt, vision_size)
from unipic_core.tiny_rewards import write_editscore_adapter

TINY_ADAPTER = "EditScore-tiny"
INSTRUCTIONS = ["make it snow", "add a red hat"]


@pytest.fixture(scope="module")
def qwen_dir(tiny_metaquery_dir) -> Path:
    return tiny_metaquery_dir / "Qwen2.5-VL-tiny"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, qwen_dir) -> Path:
    return write_editscore_adapter(tmp_path_factory.mktemp("reward") / TINY_ADAPTER, qwen_dir)


@pytest.fixture(scope="module")
def base_qwen(qwen_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def merged_qwen(qwen_dir, adapter_dir):
    """The reference: EditScore's loading (PeftModel.from_pretrained, merge_and_unload) on a fresh tiny Qwen."""
    from peft import PeftModel

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def pictures(count: int, seed: int, height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.rand(count, height, width, 3, generator=torch.Generator().manual_seed(seed))


def copy_adapter(adapter_dir: Path, tmp_path: Path, weights=None, config=None) -> Path:
    copy = shutil.copytree(adapter_dir, tmp_path / "adapter")
    if weights is not None:
        save_file(weights, str(copy / "adapter_model.safetensors"))
    if config is not None:
        (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


# --- the published prompts, parsing and formula ----------------------------------------------------------------

def test_prompts_are_the_published_text_with_the_score_range():
    sc, pq = sc_prompt("make it snow"), pq_prompt()
    assert sc.startswith("You are a professional digital artist. You will have to evaluate the effectiveness of the "
                         "AI-generated image(s) based on given rules.\n")
    assert '{\n"reasoning" : "...",\n"score" : [...]\n}\n\nRULES:\n\nTwo images will be provided:' in sc
    assert "\n\n\nFrom scale 0 to 25: \nA score from 0 to 25 will be given based on the success of the editing." in sc
    assert sc.endswith("'score2' evaluates the degree of overediting.\n\nEditing instruction: make it snow\n")
    assert "10" not in sc and "10" not in pq and "<instruction>" not in sc
    assert "\n\nRULES:\n\nThe image is an AI-generated image." in pq
    assert "artifacts. \n(\n    0 indicates that the image contains a large portion" in pq  # trailing spaces kept
    assert pq.endswith("    25 indicates the image has no artifacts.\n)\nPut the score in a list such that output "
                       "score = [naturalness, artifacts]\n")
    # sha256 of the prompts their EditScore class builds (score_range 25; empty instruction), from
    # editscore/vie_prompts.py of VectorSpaceLab/EditScore at 6e0f1b9
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]
    assert (digest(sc_prompt("")), digest(pq)) == ("61639fd05fd95d7f", "8249deba103d112d")


def test_chat_text_is_their_template_with_numbered_images():
    assert chat_text("Q", 2) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                 "<img1>: <|vision_start|><|image_pad|><|vision_end|>"
                                 "<img2>: <|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
                                 "<|im_start|>assistant\n")


# Answers and the scores the published parser (editscore/json_parser.py) finds in them.
PARSED = [
    ('{"reasoning": "ok", "score": [20, 15]}', [20, 15], "ok"),
    ('x ||V^=^V|| {"reasoning" : "The edit", "score" : [25, 3]} ||V^=^V||', [25, 3], "The edit"),
    ("{'reasoning': 'fine', 'score': [10, 12]}", [10, 12], "fine"),  # Python quotes
    ('{reasoning: "fine", score: [10, 12]}', [10, 12], "fine"),  # bare keys
    ('{"reasoning": "the "cat" is there", "score": [18, 22]}', [18, 22], 'the "cat" is there'),
    ('{"reasoning": "x", "score": 7}', [7], "x"),
    ('{"reasoning": "a", "score": ["8", true, [1, 2], 5]}', [8, 1, 5], "a"),
    ('{"reasoning": "Use True", "score": [3, None]}', [3], "Use true"),  # their literal fix reaches the text
    ('{"reasoning": "broken", "score": [3, 4.5]', [3, 4.5], "broken"),  # no closing brace: number extraction
    ('{"reasoning": "x", "score": [1e1, .5]}', [1, 1, 0.5], "x"),  # extraction reads 1e1 as 1 and 1
    ('{"reason": "r", "score": [1, 2]} then {"x": 1}', [1, 2, 1], None),  # the outermost braces
    ("Score: [20, 21]", [20, 21], None),
    ("[8, 9]", [8, 9], None),
    ("12", [12], None),
    ('{"reasoning": "a", "score": ["eight", 5]}', [5], "a"),  # theirs raises here; we fall through to extraction
    ('{"score": []}', [], None),
    ("{}", [], None),
    ("   ", [], None),
]


@pytest.mark.parametrize("answer,scores,reasoning", PARSED)
def test_answers_parse_as_the_published_parser(answer, scores, reasoning):
    judgement = parse_judgement(answer)
    assert judgement.scores == [float(s) for s in scores]
    if reasoning is not None:
        assert judgement.reasoning == reasoning


def test_overall_score_is_sqrt_of_the_normalised_minimums():
    assert overall_score([20, 15], [25, 22.5]) == pytest.approx(math.sqrt(6 * 9))
    assert overall_score([], [25, 25]) == pytest.approx(math.sqrt(5 * 10))  # no scores: range / 2 -> 5
    assert overall_score([30, 20], [25]) == pytest.approx(math.sqrt(8 * 10))  # the minimum counts
    assert overall_score([30], [25]) == pytest.approx(math.sqrt(12.5 * 10))  # 12 > 10: range / 2, not rescaled
    assert overall_score([-1, 20], [25]) == pytest.approx(math.sqrt(12.5 * 10))
    assert overall_score([20, 10], [5, 30], score_range=10) == pytest.approx(math.sqrt(10 * 5))
    assert reward_from_passes([6.0, 8.0]) == pytest.approx(0.7)


def test_images_are_resized_as_qwen_vl_utils():
    assert vision_size(512, 512) == (504, 504)
    assert vision_size(10, 1000) == (28, 1008)  # a side never rounds to 0
    assert vision_size(40, 40) == (56, 56)  # up to 4 merged tokens
    height, width = vision_size(4000, 5000)
    assert (height, width) == (3192, 4004) and height * width <= 16384 * 28 * 28
    with pytest.raises(ValueError, match="too elongated"):
        vision_size(10, 3000)


# --- the adapter: published layout, strict keys ---------------------------------------------------------------

def test_tiny_adapter_has_peft_layout_and_maps_every_key(adapter_dir, base_qwen):
    assert {p.name for p in adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    lora = read_qwen25vl_lora(adapter_dir, base_qwen, EDITSCORE_REPO)
    assert len(lora) == len(keys) // 2 == 2 * 7 + 8 * 3  # 2 LM layers x 7 projections, 8 vision blocks' MLPs
    q = lora["model.language_model.layers.1.self_attn.q_proj"]
    assert torch.equal(q.down, keys["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"])
    assert q.alpha == 8.0 and q.up.abs().sum() > 0
    assert "model.visual.blocks.3.mlp.up_proj" in lora


def test_the_older_transformers_layout_maps_to_the_same_modules(adapter_dir, base_qwen, tmp_path):
    old = {k.replace("model.model.language_model.", "model.model.").replace("model.model.visual.", "model.visual."): v
           for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in old
    assert "base_model.model.visual.blocks.0.mlp.up_proj.lora_A.weight" in old
    ours = read_qwen25vl_lora(copy_adapter(adapter_dir, tmp_path, weights=old), base_qwen, EDITSCORE_REPO)
    assert ours.keys() == read_qwen25vl_lora(adapter_dir, base_qwen, EDITSCORE_REPO).keys()


def test_bad_adapters_are_refused_naming_the_problem(adapter_dir, base_qwen, tiny_kontext_dir, tmp_path):
    read = lambda folder: read_qwen25vl_lora(folder, base_qwen, EDITSCORE_REPO)
    with pytest.raises(CheckpointError, match="'adapter_config.json' not found in .* peft LoRA adapter folder .* "
                                              "download EditScore/EditScore-7B"):
        read(tiny_kontext_dir)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    cases = [
        ({**weights, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}, None,
         "key 'base_model.model.model.embed_tokens.lora_embedding_A' names no LoRA weight"),
        ({**weights, "base_model.model.model.layers.0.input_layernorm.lora_A.weight": torch.zeros(4, 128),
          "base_model.model.model.layers.0.input_layernorm.lora_B.weight": torch.zeros(128, 4)}, None,
         "adapts 'model.language_model.layers.0.input_layernorm', which is no Linear layer"),
        ({**weights, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 128),
          "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(128, 4)}, None,
         "adapts 'model.language_model.layers.9.self_attn.q_proj', which is no Linear layer"),
        ({k: v for k, v in weights.items() if not k.endswith("layers.0.mlp.up_proj.lora_B.weight")}, None,
         "'model.language_model.layers.0.mlp.up_proj' has no lora_B weight"),
        ({k: v for k, v in weights.items() if not k.endswith("layers.1.self_attn.v_proj.lora_A.weight")}, None,
         "'model.language_model.layers.1.self_attn.v_proj' has no lora_A weight"),
        (None, {**config, "r": 8}, "do not give rank 8"),
        (None, {**config, "use_dora": True}, "'use_dora' is set"),
        (None, {**config, "peft_type": "LOHA"}, "only LoRA adapters"),
    ]
    for n, (bad_weights, bad_config, message) in enumerate(cases):
        folder = copy_adapter(adapter_dir, tmp_path / str(n), bad_weights, bad_config)
        with pytest.raises(CheckpointError, match=message):
            read(folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="'adapter_model.safetensors' not found"):
        read(folder)


def test_rank_stabilised_alpha_gives_peft_scale(adapter_dir, base_qwen, tmp_path):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    folder = copy_adapter(adapter_dir, tmp_path, config={**config, "use_rslora": True})
    lora = read_qwen25vl_lora(folder, base_qwen, EDITSCORE_REPO)
    assert next(iter(lora.values())).alpha / 4 == pytest.approx(8 / math.sqrt(4))  # ComfyUI: alpha / r


# --- the node in the real host --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def editscore_host(host, adapter_dir):
    models = host.loras.parent / "unipic2"
    (models / TINY_ADAPTER).symlink_to(adapter_dir, target_is_directory=True)
    yield host
    (models / TINY_ADAPTER).unlink()


@pytest.fixture(scope="module")
def mllm(editscore_host):
    return editscore_host.node("LoadUniPic2MetaQuery").load("UniPic2-tiny-MetaQuery", "(inside the checkpoint)",
                                                            "fp32", "default")[1]


def editscore_patcher(editscore_host):
    (patcher,) = editscore_host.module("nodes.reward_nodes")._LOADED["editscore"].values()
    return patcher


def module_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_the_node_patches_the_loaded_mllm_as_peft_merges_and_restores_it(editscore_host, mllm, merged_qwen):
    from conftest import largest_difference

    spec = editscore_host.nodes.NODE_CLASS_MAPPINGS["UniPic2EditScoreReward"].INPUT_TYPES()["required"]
    choices = spec["adapter"][0]
    assert choices[:2] == [EDITSCORE_REPO, TINY_ADAPTER] and "UniPic2-tiny-MetaQuery" not in choices
    editscore_host.node("UniPic2EditScoreReward").make(mllm, TINY_ADAPTER, 1, 42)
    patcher = editscore_patcher(editscore_host)
    assert patcher.model is mllm.mllm_patcher.model  # a clone: the same weights, no second copy
    assert len(patcher.patches) == 38
    base = editscore_host.module("nodes.host.memory").load_on_device(mllm.mllm_patcher)[0]
    original = module_weights(base)
    (patched,) = editscore_host.module("nodes.host.memory").load_on_device(patcher)
    assert patched is base
    reference = merged_qwen.state_dict()
    ours = module_weights(patched)
    assert ours.keys() == reference.keys()
    assert largest_difference([ours[k] for k in ours], [reference[k] for k in ours]) <= 1e-5
    assert largest_difference([ours[k] for k in ours], [original[k] for k in ours]) > 1e-3  # the LoRA does change it
    editscore_host.module("nodes.host.memory").load_on_device(mllm.mllm_patcher)  # the MetaQuery encoder's turn
    assert all(torch.equal(v, original[k]) for k, v in base.state_dict().items())


def test_a_lora_naming_a_layer_the_model_lacks_is_refused_not_half_applied(editscore_host, mllm, adapter_dir):
    memory = editscore_host.module("nodes.host.memory")
    lora = editscore_host.module("unipic_core.models.qwen25vl_lora").read_qwen25vl_lora(adapter_dir, mllm.encoder.mllm,
                                                                                 EDITSCORE_REPO)
    assert len(memory.patch_component_lora(mllm.mllm_patcher, lora).patches) == len(lora)
    lora["model.language_model.layers.9.self_attn.q_proj"] = next(iter(lora.values()))
    with pytest.raises(ValueError, match=r"adapts 39 layers, but only 38 were patched .*layers\.9\.self_attn"):
        memory.patch_component_lora(mllm.mllm_patcher, lora)


def reference_answer(model, processor, images: list[torch.Tensor], prompt: str, seed: int, max_new_tokens: int) -> str:
    """EditScore's RL pipeline in transformers, written out: their chat text, qwen_vl_utils' resize (PIL bicubic to
    sides rounded to 28), the processor, the seed set just before sampling with their vLLM backbone's published
    SamplingParams (temperature 0.7, top-p 0.9, top-k 20, vLLM's repetition penalty 1.0)."""
    from unipic_core.inference.images import to_pil

    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + "".join(f"<img{i}>: <|vision_start|><|image_pad|><|vision_end|>" for i in range(1, len(images) + 1))
            + prompt + "<|im_end|>\n<|im_start|>assistant\n")
    pils = [to_pil(image).resize((round(image.shape[1] / 28) * 28, round(image.shape[0] / 28) * 28))
            for image in images]
    inputs = processor(text=[text], images=pils, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                         repetition_penalty=1.0)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)[0].strip()


def test_answers_and_scores_equal_the_published_pipeline_on_the_same_weights(editscore_host, mllm, merged_qwen,
                                                                              qwen_dir):
    from unipic_core.rewards.editscore import editscore

    editscore_host.node("UniPic2EditScoreReward").make(mllm, TINY_ADAPTER, 2, 7)
    editscore_host.module("nodes.host.memory").load_on_device(editscore_patcher(editscore_host))
    sources, edited = pictures(2, 0), pictures(2, 1, 72, 112)
    ours = editscore(mllm.encoder, sources, edited, INSTRUCTIONS, passes=2, seed=7, max_new_tokens=24)
    processor = AutoProcessor.from_pretrained(str(qwen_dir))
    assert merged_qwen.generation_config.repetition_penalty == 1.05  # Qwen's default, which the published 1.0 overrides
    for i, instruction in enumerate(INSTRUCTIONS):
        overalls = []
        for n in range(2):
            images = [sources[i], edited[i]]
            sc = reference_answer(merged_qwen, processor, images, sc_prompt(instruction), 7 + n, 24)
            pq = reference_answer(merged_qwen, processor, images, pq_prompt(), 7 + n, 24)
            assert ours.answers[i][n] == (sc, pq)
            overalls.append(overall_score(parse_judgement(sc).scores, parse_judgement(pq).scores))
        assert ours.rewards[i].item() == pytest.approx(reward_from_passes(overalls))
    assert ours.answers[0][0] != ours.answers[0][1]  # the passes sample with their own seeds


def test_a_partially_loaded_patched_mllm_answers_as_a_full_load(editscore_host, mllm):
    from conftest import loaded_with_budget, offloaded_modules
    from unipic_core.rewards.editscore import editscore

    editscore_host.node("UniPic2EditScoreReward").make(mllm, TINY_ADAPTER, 1, 42)
    patcher = editscore_patcher(editscore_host)
    editscore_host.module("nodes.host.memory").load_on_device(patcher)
    sources, edited = pictures(1, 2), pictures(1, 3)
    full = editscore(mllm.encoder, sources, edited, INSTRUCTIONS[:1], max_new_tokens=24)
    patcher.detach()
    with loaded_with_budget(patcher, 0.3):  # LoRA patches applied per forward on the offloaded layers
        assert offloaded_modules(patcher) > 0
        partial = editscore(mllm.encoder, sources, edited, INSTRUCTIONS[:1], max_new_tokens=24)
    assert partial.answers == full.answers and torch.equal(partial.rewards, full.rewards)
    editscore_host.module("nodes.host.memory").load_on_device(mllm.mllm_patcher)
    assert editscore(mllm.encoder, sources, edited, INSTRUCTIONS[:1], max_new_tokens=24).answers != full.answers


def test_the_node_scores_edit_pairs_end_to_end(editscore_host, mllm):
    reward = editscore_host.node("UniPic2EditScoreReward").make(mllm, TINY_ADAPTER, 1, 42)[0]
    assert reward.names == ["editscore"] and reward.terms[0].needs_sources
    assert reward.fingerprint == [f"editscore x 1 [{TINY_ADAPTER} on Qwen2.5-VL-tiny, fp32, mllm_weights default, "
                                  "1 pass(es), seed 42]"]  # another MLLM, another reward: a resume is refused
    sources, edited = pictures(2, 0), pictures(2, 1)
    scores = reward.score(edited, INSTRUCTIONS, sources)["editscore"]
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 1.25)).all()  # 0..1, up to 1.25 through the published out-of-range rule
    assert torch.equal(reward.score(edited, INSTRUCTIONS, sources)["editscore"], scores)  # seeded: it repeats
    with pytest.raises(ValueError, match="compares with the source image"):
        reward.score(edited, INSTRUCTIONS, None)


def test_an_mllm_without_output_layer_is_refused(editscore_host, mllm):
    MissingOutputLayer = editscore_host.module("unipic_core.models.qwen25vl").MissingOutputLayer  # the host's copy
    qwen, head = mllm.encoder.mllm, mllm.encoder.mllm.lm_head
    qwen.lm_head = MissingOutputLayer(Path("qwen_2.5_vl_7b.safetensors"))  # as the text-encoder file loads
    try:
        with pytest.raises(ValueError, match="'mllm' was loaded from qwen_2.5_vl_7b.safetensors, which has no "
                                             "output layer .* choose the Qwen2.5-VL-7B-Instruct folder"):
            editscore_host.node("UniPic2EditScoreReward").make(mllm, TINY_ADAPTER, 1, 42)
    finally:
        qwen.lm_head = head


def test_the_hub_choice_downloads_only_the_adapter_files(editscore_host, mllm, adapter_dir, monkeypatch):
    import huggingface_hub

    fetched = {}

    def fake_snapshot_download(repo_id, local_dir, tqdm_class, allow_patterns):
        fetched[repo_id] = set(allow_patterns)
        shutil.copytree(adapter_dir, local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    editscore_host.node("UniPic2EditScoreReward").make(mllm, EDITSCORE_REPO, 1, 42)
    assert fetched == {EDITSCORE_REPO: {"adapter_config.json", "adapter_model.safetensors"}}
    download = Path(editscore_host.module("nodes.host.folders").unipic2_download_folder()) / "EditScore-7B"
    assert (download / "adapter_model.safetensors").is_file()
    shutil.rmtree(download)


def test_an_mllm_with_fp8_weights_is_refused(adapter_dir, qwen_dir):
    from unipic_core.models.fp8_weights import quantize_linears

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(qwen_dir), dtype=torch.float32)
    quantize_linears(model, torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match="EditScore: the MLLM holds fp8 weights .* a LoRA cannot patch fp8 "
                                              "weights; load it from a bf16 Qwen2.5-VL-7B-Instruct"):
        read_qwen25vl_lora(adapter_dir, model, EDITSCORE_REPO)
