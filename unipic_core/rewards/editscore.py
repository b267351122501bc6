"""EditScore (Luo et al. 2025, VectorSpaceLab/EditScore): an edit reward read from Qwen2.5-VL-7B-Instruct's answers
once the EditScore-7B LoRA is applied.

The recipe is the published RL reward's (their reward server calling `EditScore.batch_evaluate`, score range 25):
- two questions per edit, each asked with the source image then the edited image: semantic consistency (SC: did the
  edit follow the instruction, and how little did it over-edit) and perceptual quality (PQ: naturalness, artifacts);
  the prompts are the published ones with every "10" replaced by the score range;
- the chat text is their own template (default system turn, `<imgN>: ` before each image's vision tokens, the prompt
  right after the last image); images are resized as qwen_vl_utils does (sides multiples of 28, 4..16384 merged
  tokens, bicubic), the default budget their server's `process_vision_info` call applies too;
- each question is answered by sampling with their vLLM backbone's explicit SamplingParams (editscore/mllm_tools/
  qwen25vl_vllm.py): temperature 0.7 (their server configs), top-p 0.9, top-k 20, at most 512 new tokens, and
  vLLM's defaults for the rest, so no repetition penalty (1.0; Qwen2.5-VL-7B-Instruct's generation config would
  give 1.05); the seed is seed + pass index (vLLM draws from a per-request generator, we from torch's global one,
  so the same seed does not give their exact samples);
- their server runs vLLM with max_model_len 1536 (prompt and answer together) and does not shrink images to fit
  it, so only small ones pass (two of 512 x 512 px take ~650 tokens); we give each image qwen_vl_utils' default
  budget and cap only the answer (512 tokens), so large images cost more here but are judged rather than refused;
- each answer is parsed into a list of scores (their JSON repair stages, then a last-resort number extraction); a
  pass scores SC = min(SC scores) and PQ = min(PQ scores), each divided by range/10; an answer without scores counts
  as range/2, and a score outside 0..10 becomes range/2 (12.5 for range 25: their code does this, so a reward can
  reach 1.25); overall = sqrt(SC * PQ);
- the overall scores of the passes are averaged ("average_last"), and the reward is overall / 10, about 0..1.
Their benchmark path (`EditScore.evaluate`) differs: PQ sees the edited image only, and unparsable answers are asked
again, then guessed at random; we follow the RL path, whose parser needs no extra package and never guesses.
One deviation: an answer whose "score" list holds a word (["eight", 5]) crashes their parser; here that repair
stage counts as failed and the next one runs.
"""

import json
import math
import re
from dataclasses import dataclass

import torch

from ..inference.images import round_to_multiple, to_pil
from ..models.metaquery import MetaQueryMLLM, seeded_answer

SCORE_RANGE = 25  # what EditScore-7B was trained and published with (their scripts' --score_range 25)
SEED = 42  # their default
# Their RL backbone's vLLM SamplingParams (temperature from their server configs); vLLM's defaults fill the rest,
# so repetition_penalty is 1.0, not the 1.05 of Qwen2.5-VL-7B-Instruct's generation config that generate would use.
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=512, repetition_penalty=1.0)
# qwen_vl_utils' image budget: 4..16384 merged tokens of 28x28 pixels
IMAGE_FACTOR, MIN_PIXELS, MAX_PIXELS, MAX_ASPECT = 28, 4 * 28 * 28, 16384 * 28 * 28, 200

# --- The published prompt texts, verbatim: editscore/vie_prompts.py of VectorSpaceLab/EditScore (commit 6e0f1b9).
# They are data the model was trained on; trailing spaces included, long lines continued with a backslash (which
# adds nothing to the text).
CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated \
image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the \
privacy confidentials.

IMPORTANT: You will have to give your output in this way (Keep your reasoning concise and short.):
{
"reasoning" : "...",
"score" : [...]
}
"""
TWO_IMAGE_EDIT_RULE = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version \
of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.
"""
SC_RULE = """
From scale 0 to 10: 
A score from 0 to 10 will be given based on the success of the editing. (0 indicates that the scene in the edited \
image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the \
editing instruction text perfectly.)
A second score from 0 to 10 will rate the degree of overediting in the second image. (0 indicates that the scene in \
the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a \
minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and \
'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""
PQ_RULE = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 0 to 10: 
A score from 0 to 10 will be given based on image naturalness. 
(
    0 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong \
sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 0 to 10 will rate the image artifacts. 
(
    0 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, \
or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]
"""
# Their chat text (editscore/mllm_tools/qwen25vl_vllm.py), written out because the chat template cannot number images.
SYSTEM_AND_USER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
IMAGE_SLOT = "<img{n}>: <|vision_start|><|image_pad|><|vision_end|>"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"


def sc_prompt(instruction: str, score_range: int = SCORE_RANGE) -> str:
    """The semantic-consistency question for one instruction (the range goes in first, as theirs)."""
    rule = SC_RULE.replace("10", str(score_range))
    return "\n".join([CONTEXT, TWO_IMAGE_EDIT_RULE, rule]).replace("<instruction>", instruction)


def pq_prompt(score_range: int = SCORE_RANGE) -> str:
    """The perceptual-quality question."""
    return "\n".join([CONTEXT, PQ_RULE.replace("10", str(score_range))])


def chat_text(prompt: str, num_images: int) -> str:
    return SYSTEM_AND_USER + "".join(IMAGE_SLOT.format(n=n) for n in range(1, num_images + 1)) + prompt + ASSISTANT


# --- Parsing an answer ------------------------------------------------------------------------------------------

@dataclass
class Judgement:
    scores: list[float]  # as the model wrote them (0..range when it follows the prompt); empty if none were found
    reasoning: str


def _judgement(data) -> Judgement | None:
    """A parsed JSON value as a Judgement, or None when it holds neither reasoning nor scores."""
    if not isinstance(data, dict):
        return None
    reasoning = next((data[key] for key in ("reasoning", "reason", "rationale") if isinstance(data.get(key), str)), "")
    value = data.get("score")
    if isinstance(value, list):
        scores = [float(item) for item in value if isinstance(item, (int, float, str))]
    elif isinstance(value, (int, float)):
        scores = [float(value)]
    else:
        scores = []
    return Judgement(scores, reasoning) if reasoning or scores else None


def _python_literals_and_bare_keys(text: str) -> str:
    """Python's True/False/None as JSON; single quotes as double ones if that alone makes valid JSON, else bare
    keys quoted."""
    text = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))
    swapped = text.replace("'", '"')
    try:
        json.loads(swapped)
        return swapped
    except json.JSONDecodeError:
        return re.sub(r"([\{\s,])(\w+)\s*:", r'\1"\2":', text)


def _escape_reasoning_quotes(text: str) -> str:
    """Escape the double quotes inside the reasoning value (up to the quote that a comma or brace follows)."""
    return re.sub(r'("reasoning"\s*:\s*")(.*?)(?="\s*[,}])', lambda m: m.group(1) + m.group(2).replace('"', '\\"'),
                  text, flags=re.DOTALL)


def _extracted(text: str) -> Judgement | None:
    """Last resort: the reasoning between its key and the score key, and every number after the score key."""
    reasoning = re.search(r"[\"']reasoning[\"']\s*:\s*[\"']?(.*?)[\"']?\s*,\s*[\"']score[\"']", text,
                          re.DOTALL | re.IGNORECASE)
    if reasoning:
        reasoning = reasoning.group(1).strip().replace('\\"', '"')
    else:
        score_key = re.search(r"[\"']score[\"']\s*:.*", text, re.IGNORECASE)
        reasoning = text[:score_key.start()].strip() if score_key else text
    after_key = re.search(r"[\"']score[\"']\s*:\s*(.*)", text, re.DOTALL | re.IGNORECASE)
    numbers = re.findall(r"[-+]?\d*\.?\d+", after_key.group(1) if after_key else text)
    return _judgement({"reasoning": reasoning, "score": [float(n) for n in numbers]})


def parse_judgement(answer: str) -> Judgement:
    """The scores (and reasoning) in one answer, by the published parser's stages: the outermost {...} (or the whole
    answer) as JSON; then with Python literals and bare keys fixed; then with quotes escaped inside the reasoning;
    then number extraction. Scores are empty when nothing is found."""
    if not answer.strip():
        return Judgement([], "")
    braces = re.search(r"\{.*\}", answer, re.DOTALL)
    text = braces.group(0) if braces else answer.strip()
    for repair in (lambda s: s, _python_literals_and_bare_keys, _escape_reasoning_quotes):
        try:
            found = _judgement(json.loads(repair(text)))
        except ValueError:  # invalid JSON, or a score that is not a number (see the module docstring)
            continue
        if found is not None:
            return found
    return _extracted(text) or Judgement([], "")


# --- Scores -----------------------------------------------------------------------------------------------------

def normalised_score(scores: list[float], score_range: int = SCORE_RANGE) -> float:
    """One question's score on 0..10: the lowest score given, divided by range/10; range/2 when none was given or
    the result leaves 0..10 (as published, the replacement is not rescaled)."""
    score = min(scores or [score_range / 2]) / (score_range / 10)
    return score_range / 2 if score < 0 or score > 10 else score


def overall_score(sc_scores: list[float], pq_scores: list[float], score_range: int = SCORE_RANGE) -> float:
    """One pass: sqrt(SC * PQ), each normalised to 0..10."""
    return math.sqrt(normalised_score(sc_scores, score_range) * normalised_score(pq_scores, score_range))


def reward_from_passes(overalls: list[float]) -> float:
    """The RL reward: the mean overall score of the passes ("average_last") over 10."""
    return sum(overalls) / len(overalls) / 10


# --- Asking the model -------------------------------------------------------------------------------------------

def vision_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) qwen_vl_utils resizes an image to before the processor sees it: sides rounded to multiples
    of 28, scaled down or up into its pixel budget."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"EditScore: an image of {width}x{height} is too elongated for Qwen2.5-VL (aspect ratio over "
                         f"{MAX_ASPECT}); crop it")
    f = IMAGE_FACTOR
    h, w = round_to_multiple(height, f), round_to_multiple(width, f)
    if h * w > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h, w = math.floor(height / beta / f) * f, math.floor(width / beta / f) * f
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


def question_inputs(encoder: MetaQueryMLLM, images: list[torch.Tensor], prompt: str) -> dict:
    """Processor inputs on the MLLM's device: images [H, W, 3] 0..1 resized as qwen_vl_utils does (PIL's default
    bicubic), the processor keeping that size."""
    pils = []
    for image in images:
        height, width = vision_size(image.shape[0], image.shape[1])
        pils.append(to_pil(image).resize((width, height)))
    inputs = encoder.processor(text=[chat_text(prompt, len(images))], images=pils, return_tensors="pt",
                               size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    encoder.mllm.model.rope_deltas = None  # generate computes M-RoPE positions afresh for these inputs
    return {k: v.to(encoder.device) for k, v in inputs.items()}


@dataclass
class EditScores:
    """Per edit: the reward (about 0..1) and each pass's answers (SC, PQ), for inspection."""

    rewards: torch.Tensor  # [N] float32
    answers: list[list[tuple[str, str]]]


def editscore(encoder: MetaQueryMLLM, sources: torch.Tensor, edited: torch.Tensor, instructions: list[str],
              passes: int = 1, seed: int = SEED, max_new_tokens: int = SAMPLING["max_new_tokens"]) -> EditScores:
    """EditScore of each edit: sources and edited images [N, H, W, 3] 0..1 (their sizes may differ), one instruction
    each. Costs 2 x passes generations per edit. The MLLM must hold the EditScore LoRA."""
    if not len(sources) == len(edited) == len(instructions):
        raise ValueError(f"EditScore: {len(edited)} edited images, {len(sources)} sources and {len(instructions)} "
                         "instructions; give one source and one instruction per edited image")
    if passes < 1:
        raise ValueError(f"EditScore: passes must be at least 1, got {passes}")
    rewards, answers = [], []
    for source, image, instruction in zip(sources, edited, instructions):
        sc_inputs = question_inputs(encoder, [source, image], sc_prompt(instruction))
        pq_inputs = question_inputs(encoder, [source, image], pq_prompt())  # both images, as their RL reward
        overalls, texts = [], []
        for n in range(passes):
            sc, pq = (seeded_answer(encoder, inputs, seed + n, False, **{**SAMPLING, "max_new_tokens": max_new_tokens})
                      for inputs in (sc_inputs, pq_inputs))
            overalls.append(overall_score(parse_judgement(sc).scores, parse_judgement(pq).scores))
            texts.append((sc, pq))
        rewards.append(reward_from_passes(overalls))
        answers.append(texts)
    return EditScores(torch.tensor(rewards, dtype=torch.float32), answers)
