"""The GenEval-style object reward: metadata lines parse (and malformed ones are refused by line), GenEval's rules and
Flow-GRPO's score (with our two documented deviations) hold on hand-made detections, the tiny OWLv2 in the published layout loads strictly and detects
exactly as transformers' own post-processing, and the node scores a batch in the real host."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Owlv2ForObjectDetection, Owlv2Processor

from unipic_core.inference.images import to_pil
from unipic_core.models.loading import CheckpointError
from unipic_core.rewards import Reward, RewardTerm
from unipic_core.rewards.object_reward import (COLOURS, Detection, ObjectMetadata, ObjectRequirement, box_iou,
                                               colour_of, detect, detection_queries, kept_boxes, load_owlv2,
                                               object_score, object_scores, parse_metadata, relations,
                                               requirement_terms)
from unipic_core.tiny_rewards import write_owlv2_folder
from unipic_core.training.training_data import read_prompts

TINY_OWL = "OWLv2-tiny"
OWL_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
             "tokenizer_config.json", "vocab.json", "merges.txt"}
COUNTING = ('{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", '
            '"count": 3}], "prompt": "a photo of two clocks"}')
POSITION = ('{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, '
            '"position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}')
COLOUR = ('{"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"}, {"class": '
          '"apple", "count": 1, "color": "black"}], "prompt": "a photo of a purple wine glass and a black apple"}')


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    return write_owlv2_folder(tmp_path_factory.mktemp("reward") / TINY_OWL)


@pytest.fixture(scope="module")
def owl(owl_dir):
    return load_owlv2(owl_dir)


def pictures(count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 72, 112, 3, generator=torch.Generator().manual_seed(seed))


def box(x0, y0, x1, y1, colour: str | None = None, score: float = 0.9) -> Detection:
    """A detection; with a colour, logits that make that colour win."""
    logits = None if colour is None else torch.zeros(3, len(COLOURS)).index_fill_(1, torch.tensor(
        [COLOURS.index(colour)]), 1.0)
    return Detection((x0, y0, x1, y1), score, logits)


def requirement(cls="dog", count=1, colour=None, position=None, tag="single_object", exclude=()) -> ObjectMetadata:
    return ObjectMetadata(tag, "p", (ObjectRequirement(cls, count, colour, position),), exclude)


# --- metadata lines -------------------------------------------------------------------------------------------

def test_geneval_lines_parse_into_requirements():
    counting = parse_metadata(COUNTING, "line 1")
    assert counting == ObjectMetadata("counting", "a photo of two clocks", (ObjectRequirement("clock", 2),),
                                      (("clock", 3),))
    position = parse_metadata(POSITION, "line 2")
    assert position.include[1] == ObjectRequirement("dog", 1, None, ("right of", 0))
    colour = parse_metadata(COLOUR, "line 3")
    assert [r.colour for r in colour.include] == ["purple", "black"] and colour.classes == ["wine glass", "apple"]
    assert parse_metadata(colour.to_json(), "again") == colour  # the fingerprint's form reads back the same
    assert json.loads(colour.to_json()) == json.loads(COLOUR)


@pytest.mark.parametrize("line, message", [
    ('{"tag": "counting", "include": [{"class": "a", "count": 1}], "prompt": "x"', "not valid JSON"),
    ('{"tag": "counting", "include": [{"class": "a", "count": 1}], "prompt": "x", "seed": 1}', "unknown key.*seed"),
    ('{"tag": "counting", "include": [{"class": "a", "count": 1}]}', "no 'prompt'"),
    ('{"tag": "shapes", "include": [{"class": "a", "count": 1}], "prompt": "x"}', "'tag' is 'shapes'; use one of"),
    ('{"tag": "counting", "include": [], "prompt": "x"}', "'include' must be a non-empty list"),
    ('{"tag": "counting", "include": [{"class": "a", "count": 0}], "prompt": "x"}', "'count' of at least 1"),
    ('{"tag": "counting", "include": [{"count": 1}], "prompt": "x"}', "include 0 needs a 'class'"),
    ('{"tag": "counting", "include": [{"class": "a", "count": 1, "size": 2}], "prompt": "x"}', "unknown key.*size"),
    ('{"tag": "colors", "include": [{"class": "a", "count": 1, "color": "teal"}], "prompt": "x"}',
     "'color' is 'teal'; use one of red"),
    ('{"tag": "position", "include": [{"class": "a", "count": 1, "position": ["left of", 0]}], "prompt": "x"}',
     "index of an earlier include"),
    ('{"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": '
     '["beside", 0]}], "prompt": "x"}', "relation one of left of"),
    ('{"tag": "counting", "include": [{"class": "a", "count": 3}], "exclude": [{"class": "a", "count": 2}], '
     '"prompt": "x"}', "exclude 0 asks for fewer than 2 'a' but an include asks for 3"),
])
def test_malformed_lines_are_refused_naming_the_line(line, message):
    with pytest.raises(ValueError, match=f"^'prompts' line 2: .*{message}"):
        read_prompts("a plain prompt\n" + line)


def test_a_prompt_list_mixes_plain_and_geneval_lines(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# comment\n\n" + POSITION + "\n")
    items = read_prompts("a red apple\n" + COUNTING, file)
    assert [i.prompt for i in items] == ["a red apple", "a photo of two clocks", "a photo of a dog right of a teddy bear"]
    assert items[0].metadata is None and items[1].metadata.tag == "counting" and items[2].metadata.tag == "position"
    file.write_text("ok\n\n{bad\n")
    with pytest.raises(ValueError, match=f"prompt file '{file}' line 3: not valid JSON"):
        read_prompts("", file)


def test_requirements_change_the_run_fingerprint_and_plain_prompts_keep_theirs():
    from unipic_core.training.training_data import TrainingItem
    from unipic_core.training.training_state import data_fingerprint

    other = COUNTING.replace('"class": "clock", "count": 3', '"class": "cat", "count": 1')
    assert parse_metadata(other, "x").prompt == parse_metadata(COUNTING, "x").prompt
    assert data_fingerprint(read_prompts(COUNTING)) != data_fingerprint(read_prompts(other))
    assert data_fingerprint(read_prompts("a cat")) == data_fingerprint([TrainingItem("a cat")])


# --- the rules on hand-made detections ------------------------------------------------------------------------

def test_presence_and_exact_count():
    two = requirement("clock", 2, tag="counting")
    clocks = lambda n: {"clock": [box(10 * i, 0, 10 * i + 8, 8) for i in range(n)]}
    assert [requirement_terms(clocks(n), two) for n in range(5)] == [[0.0], [0.5], [1.0], [0.5], [0.0]]
    assert requirement_terms({}, requirement("dog")) == [0.0]


def test_over_counts_go_negative_as_flow_grpo():
    """Flow-GRPO's 1 - |count - found| / count, unfloored: 2 asked, 7 found is -1.5, and 8 found ranks below it."""
    two = requirement("clock", 2, tag="counting")
    clocks = lambda n: {"clock": [box(10 * i, 0, 10 * i + 8, 8) for i in range(n)]}
    assert requirement_terms(clocks(7), two) == [-1.5] and object_score(clocks(7), two) == -1.5
    assert object_score(clocks(8), two) == -2.0
    red = requirement("car", 1, "red")  # a wrong count scores the colour as one 0: (1 - 3/1 + 0) / 2
    assert object_score({"car": [box(10 * i, 0, 10 * i + 8, 8, "red") for i in range(4)]}, red) == -1.0


def test_a_failed_position_adds_one_zero_where_flow_grpo_adds_zero_and_one():
    """Deviation 1: the dog / teddy-bear line with the dog on the wrong side scores (1 + 1 + 0) / 3, not Flow-GRPO's
    (1 + 1 + 0 + 1) / 4 = 0.75 (its evaluate_reward appends 1.0 after the failed check too)."""
    meta = parse_metadata(POSITION, "x")
    found = {"teddy bear": [box(0, 0, 20, 20)], "dog": [box(-100, 0, -80, 20)]}
    assert requirement_terms(found, meta) == [1.0, 1.0, 0.0]
    assert object_score(found, meta) == pytest.approx(2 / 3) and round(object_score(found, meta), 3) == 0.667


def test_exclude_counts_only_for_classes_no_include_counts():
    """Deviation 2 (Flow-GRPO ignores excludes): a term only for an exclude on a class no include names, so GenEval's
    own lines, whose excludes name the counted class, score as Flow-GRPO's."""
    counting = parse_metadata(COUNTING, "x")  # the exclude is implied by the exact count: no second term
    assert requirement_terms({"clock": [box(0, 0, 1, 1), box(2, 0, 3, 1), box(4, 0, 5, 1)]}, counting) == [0.5]
    no_cats = requirement("dog", exclude=(("cat", 1),))
    assert requirement_terms({"dog": [box(0, 0, 1, 1)]}, no_cats) == [1.0, 1.0]
    assert requirement_terms({"dog": [box(0, 0, 1, 1)], "cat": [box(5, 5, 6, 6)]}, no_cats) == [1.0, 0.0]


def test_colour_is_the_best_colour_averaged_over_the_three_prompts():
    logits = torch.zeros(3, len(COLOURS))
    logits[0, COLOURS.index("red")] = 3.0  # one prompt says red strongly ...
    logits[1:, COLOURS.index("blue")] = 2.0  # ... two say blue: the mean (4/3 vs 1) picks blue
    assert colour_of(logits) == "blue"
    red = requirement("car", 2, "red")
    assert requirement_terms({"car": [box(0, 0, 1, 1, "red"), box(2, 0, 3, 1, "red")]}, red) == [1.0, 1.0]
    assert requirement_terms({"car": [box(0, 0, 1, 1, "red"), box(2, 0, 3, 1, "green")]}, red) == [1.0, 0.5]
    assert requirement_terms({"car": [box(0, 0, 1, 1, "red")]}, red) == [0.5, 0.0]  # wrong count: colour scores 0


@pytest.mark.parametrize("offset, expected", [
    ((50, 0), {"right of"}), ((-50, 0), {"left of"}), ((0, -50), {"above"}), ((0, 50), {"below"}),
    ((50, 50), {"right of", "below"}), ((50, 10), {"right of"}),
])
def test_position_relations_follow_box_centres(offset, expected):
    target = (100, 100, 120, 120)
    dx, dy = offset
    assert relations((100 + dx, 100 + dy, 120 + dx, 120 + dy), target) == expected


def test_position_margin_needs_a_tenth_of_the_two_sizes():
    target = (0, 0, 100, 100)  # two 100 px boxes: each axis's offset is shortened by 0.1 x 200 = 20 px
    assert relations((19, 0, 119, 100), target) == set()  # within the margin
    assert relations((39, 0, 139, 100), target) == set()  # shortened to 19 of 39: under half
    assert relations((41, 0, 141, 100), target) == {"right of"}  # 21 of 41
    # offset (40, 70) shortened to (20, 50), over its length 80.6: 0.25 along x, 0.62 along y
    assert relations((40, 70, 140, 170), target) == {"below"}


def test_position_rule_checks_every_box_against_the_earlier_include():
    meta = parse_metadata(POSITION, "x")
    bear, right, left = box(0, 0, 20, 20), box(100, 0, 120, 20), box(-100, 0, -80, 20)
    assert requirement_terms({"teddy bear": [bear], "dog": [right]}, meta) == [1.0, 1.0, 1.0]
    assert requirement_terms({"teddy bear": [bear], "dog": [left]}, meta) == [1.0, 1.0, 0.0]
    assert requirement_terms({"dog": [right]}, meta) == [0.0, 1.0, 0.0]  # no target: the relation fails
    assert requirement_terms({"teddy bear": [bear]}, meta) == [1.0, 0.0, 0.0]  # no dog: count and position 0


def test_score_is_the_mean_of_the_terms():
    meta = parse_metadata(COLOUR, "x")
    found = {"wine glass": [box(0, 0, 1, 1, "purple")], "apple": [box(5, 5, 6, 6, "red")]}
    assert requirement_terms(found, meta) == [1.0, 1.0, 1.0, 0.0]
    assert object_score(found, meta) == 0.75


def test_suppression_keeps_the_best_of_overlapping_boxes_and_at_most_16():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [0, 0, 10, 5.]])
    scores = torch.tensor([0.5, 0.9, 0.4, 0.8])
    assert box_iou(boxes[0], boxes[1:]).tolist() == pytest.approx([9 / 11, 0.0, 0.5])
    assert kept_boxes(boxes, scores) == [1, 2]  # 3 overlaps 1 by 45/105, 0 overlaps it by 81/119: both dropped
    many = torch.tensor([[30.0 * i, 0, 30 * i + 10, 10] for i in range(20)])
    assert kept_boxes(many, torch.linspace(1, 0, 20)) == list(range(16))


# --- the tiny OWLv2 ---------------------------------------------------------------------------------------------

def test_tiny_owlv2_has_the_published_files_and_loads_strictly(owl_dir, owl, tmp_path):
    assert {p.name for p in owl_dir.iterdir()} == OWL_FILES
    assert isinstance(owl.model, Owlv2ForObjectDetection) and not owl.model.training
    assert json.loads((owl_dir / "special_tokens_map.json").read_text())["pad_token"] == "!"
    weights = load_file(str(owl_dir / "model.safetensors"))
    extra = shutil.copytree(owl_dir, tmp_path / "extra")
    save_file({**weights, "box_head.dense3.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys: box_head.dense3.weight"):
        load_owlv2(extra)
    missing = shutil.copytree(owl_dir, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if k != "class_head.logit_scale.bias"}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: class_head.logit_scale.bias"):
        load_owlv2(missing)


def test_detections_match_transformers_post_processing(owl_dir, owl):
    """Our per-class detections before suppression = Owlv2Processor + model + post_process_object_detection."""
    meta = ObjectMetadata("two_object", "p", (ObjectRequirement("cat", 1), ObjectRequirement("tv remote", 1)))
    images, threshold = pictures(), 0.55
    processor = Owlv2Processor.from_pretrained(str(owl_dir))
    model = Owlv2ForObjectDetection.from_pretrained(str(owl_dir)).eval()
    texts, _ = detection_queries(meta)
    inputs = processor(text=[texts] * len(images), images=[to_pil(i) for i in images], return_tensors="pt",
                       truncation=True)
    with torch.no_grad():
        outputs = model(**inputs)
    side = max(images.shape[1:3])
    expected = processor.image_processor.post_process_object_detection(outputs, threshold,
                                                                       target_sizes=[(side, side)] * len(images))
    import unipic_core.rewards.object_reward as engine

    everything = engine.MAX_OBJECTS, engine.NMS_IOU
    engine.MAX_OBJECTS, engine.NMS_IOU = 10**6, 2.0  # no cap, no suppression: compare the raw detections
    try:
        found = detect(owl, images, meta, threshold)
    finally:
        engine.MAX_OBJECTS, engine.NMS_IOU = everything
    for ours, theirs in zip(found, expected):
        assert sum(len(v) for v in ours.values()) == len(theirs["scores"]) > 0
        for label, cls in enumerate(meta.classes):
            mine = sorted((d.score, d.box) for d in ours[cls])
            ref = sorted((float(s), tuple(b.tolist())) for s, b, l in zip(theirs["scores"], theirs["boxes"],
                                                                          theirs["labels"]) if l == label)
            assert torch.allclose(torch.tensor([s for s, _ in mine]), torch.tensor([s for s, _ in ref]), rtol=0,
                                  atol=1e-5)
            assert torch.allclose(torch.tensor([b for _, b in mine]) / side, torch.tensor([b for _, b in ref]) / side,
                                  rtol=0, atol=1e-5)


def test_colour_logits_are_the_boxes_logits_for_the_colour_queries(owl):
    meta = parse_metadata(COLOUR, "x")
    texts, start = detection_queries(meta)
    assert texts[:2] == ["a photo of a wine glass", "a photo of a apple"] and start == {"wine glass": 2, "apple": 32}
    assert texts[2:5] == ["a photo of a red wine glass", "a photo of a orange wine glass", "a photo of a yellow wine glass"]
    found = detect(owl, pictures(1), meta, 0.5)[0]
    assert all(d.colour_logits.shape == (3, len(COLOURS)) for d in found["apple"] + found["wine glass"])


def test_object_scores_are_finite_at_most_1_and_group_images_by_prompt(owl):
    metas = [parse_metadata(line, "x") for line in (COUNTING, POSITION, COUNTING)]
    scores = object_scores(owl, pictures(), metas, 0.58, 0.58)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert bool(((scores >= -14) & (scores <= 1)).all())
    assert scores[0] == object_score(detect(owl, pictures()[:1], metas[0], 0.58)[0], metas[0])


def test_a_folder_that_is_no_owlv2_is_refused(tiny_kontext_dir, tmp_path):
    with pytest.raises(CheckpointError, match="is not a transformers OWLv2 folder .* download google/owlv2-base"):
        load_owlv2(tiny_kontext_dir)
    with pytest.raises(CheckpointError, match="is not a transformers OWLv2 folder"):
        load_owlv2(tmp_path / "nothing")


@pytest.mark.parametrize("missing", ["preprocessor_config.json", "vocab.json"])
def test_missing_processor_files_are_named(owl_dir, tmp_path, missing):
    folder = shutil.copytree(owl_dir, tmp_path / "owl")
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=r"has no OWLv2 processor files \(preprocessor_config.json, and "
                                              r"tokenizer.json or vocab.json \+ merges.txt\); copy them from google/"):
        load_owlv2(folder)


# --- the reward on plain prompts, and the node in the host ----------------------------------------------------

def test_a_metadata_reward_on_plain_prompts_says_how_to_write_the_lines():
    reward = Reward([RewardTerm("objects", 1.0, lambda images, prompts, sources, metadata: torch.ones(len(images)),
                                needs_metadata=True)])
    with pytest.raises(ValueError, match="'objects' reward checks the objects .* 'a cat' is a plain prompt; write "
                                         "GenEval-style lines in UniPic2 Prompt List"):
        reward.score(pictures(2), ["a cat", "a cat"], None)
    meta = parse_metadata(COUNTING, "x")
    assert reward.score(pictures(2), ["p", "p"], None, [meta, meta])["objects"].tolist() == [1.0, 1.0]


@pytest.fixture(scope="module")
def reward_host(host, owl_dir):
    models = host.loras.parent / "unipic2"  # the tests' models/unipic2
    (models / TINY_OWL).symlink_to(owl_dir, target_is_directory=True)
    yield host
    (models / TINY_OWL).unlink()


def test_object_reward_node_scores_a_batch_under_a_model_patcher(reward_host, owl):
    from comfy.model_patcher import ModelPatcher

    spec = reward_host.nodes.NODE_CLASS_MAPPINGS["UniPic2ObjectReward"].INPUT_TYPES()["required"]
    assert spec["detector"][0][0] == "google/owlv2-base-patch16-ensemble" and TINY_OWL in spec["detector"][0]
    assert "UniPic2-tiny-Kontext" not in spec["detector"][0]
    reward = reward_host.node("UniPic2ObjectReward").make(TINY_OWL, 0.58, 0.58, "fp32")[0]
    assert reward.names == ["objects"] and "0.58/0.58" in reward.fingerprint[0]
    items = reward_host.node("UniPic2PromptList").make("a plain prompt\n" + COUNTING + "\n" + POSITION)[0]
    metas = [items[1].metadata, items[2].metadata, items[1].metadata, items[2].metadata]
    scores = reward.score(pictures(4), [m.prompt for m in metas], None, metas)["objects"]
    assert torch.isfinite(scores).all() and bool(((scores >= -14) & (scores <= 1)).all())
    assert torch.allclose(scores, object_scores(owl, pictures(4), metas, 0.58, 0.58), atol=1e-6)
    (_, patcher), = reward_host.module("nodes.reward_nodes")._LOADED["object"].values()
    assert isinstance(patcher, ModelPatcher) and patcher.model_size() > 0
    with pytest.raises(ValueError, match="write GenEval-style lines in UniPic2 Prompt List"):
        reward.score(pictures(1), [items[0].prompt], None, [items[0].metadata])
