"""A GenEval-style object reward: a zero-shot detector (OWLv2) checks the objects a structured prompt asks for.

Metadata: one JSON object per prompt line, in the format of GenEval's prompts/evaluation_metadata.jsonl, e.g.
    {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
     {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a teddy bear"}
`include` items: class, count, optional color (GenEval's ten) and position [relation, index of an earlier include];
`exclude` items: class, count (the image should hold fewer). The tag picks the detection threshold (counting lines
have their own, as in GenEval).

Detection follows GenEval's evaluate_images.py with OWLv2 (google/owlv2-base-patch16-ensemble) in place of its
closed-vocabulary Mask2Former: the prompt's classes are the text queries ("a photo of a {class}"); each box takes the
query it matches best (transformers' post-processing); per class, boxes above the threshold, most confident first,
non-maximum suppression, at most 16.
Colour: OWLv2's own box embedding against GenEval's colour prompts ("a photo of a {color} {class}", "...
{color}-colored {class}", "... {color} object"), logits averaged over the three, the best colour wins -- GenEval runs a
CLIP on the crop with these prompts; the detector's box embedding is the same kind of CLIP-trained embedding, so no
second model is needed.
Position: GenEval's rule on box centres with a margin of 0.1 x the two boxes' sizes (relations).

Score (Flow-GRPO's GenEval training reward, yifan123/reward-server gen_eval.evaluate_reward): the mean of one term
per requirement -- per include 1 - |count - found| / count, then, when the count is exact, its colour (share of its
boxes with the right colour) and its position (1 when every box stands in the relation to every box of the target
include); a wrong count scores its colour / position as one 0. At most 1, and below 0 when far more objects are found
than asked, as in Flow-GRPO (2 asked, 7 found: 1 - 5/2 = -1.5), so over-counts still rank among themselves; the
cap of 16 boxes per class bounds a term, and so the score, at -14.
Two deliberate deviations from evaluate_reward: (1) a failed position check adds one 0 where Flow-GRPO appends 0 and
then, unconditionally, 1 (the 1 after its loop looks like a slip: a failed check scores as much as a passed one); on
the dog / teddy-bear line with the dog on the wrong side Flow-GRPO gives (1 + 1 + 0 + 1) / 4 = 0.75, we give
(1 + 1 + 0) / 3 = 0.667. (2) Flow-GRPO ignores `exclude`; we add, for each exclude on a class no include names, 1
when fewer than its count are found, else 0, so that a hand-written "no cat" has an effect. GenEval's own lines only
exclude an included class (counting's "fewer than count + 1"), which the exact count already implies: on them this
term never fires and the score equals Flow-GRPO's (but for deviation 1).

Thresholds: not validated on real images here. The defaults (0.1 for every tag) follow the published OWLv2 usage:
transformers' OWLv2 example keeps boxes above 0.1 (its two clearly visible cats score 0.61 and 0.67), and LLM-grounded
Diffusion's counting / spatial benchmark counts OWL-ViT boxes above 0.05 after suppression. GenEval's stricter counting
threshold (0.9 vs 0.3) is tuned to Mask2Former's scores and has no OWLv2 counterpart we can cite, so counting starts
equal. An OWL-ViT user reports many false objects for a single text query at 0.1 (google-research/scenic issue
657): raise either threshold if extra objects break exact counts.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..inference.images import to_pil
from ..models.folders import is_owlv2_folder
from ..models.loading import CheckpointError, load_pretrained, weight_files
from ..models.repos import OWLV2_REPO
from . import METADATA_EXAMPLE

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")  # GenEval's
RELATIONS = ("left of", "right of", "above", "below")
OBJECT_QUERY = "a photo of a {cls}"
COLOUR_QUERIES = ("a photo of a {colour} {cls}", "a photo of a {colour}-colored {cls}", "a photo of a {colour} object")
# GenEval keeps Mask2Former boxes above 0.3 (0.9 for counting); OWLv2's scores are another scale: see the module
# docstring for where 0.1 comes from (unvalidated here). Both are node inputs.
SCORE_THRESHOLD, COUNTING_THRESHOLD = 0.1, 0.1
# GenEval needs no suppression (Mask2Former does not repeat an object); OWLv2 predicts a box per image patch, so one
# object gets several: 0.3 IoU is transformers' OWL suppression default. Suppression runs before the cap of 16.
NMS_IOU, MAX_OBJECTS = 0.3, 16
POSITION_MARGIN = 0.1  # GenEval's position_threshold
METADATA_KEYS, INCLUDE_KEYS, EXCLUDE_KEYS = {"tag", "include", "exclude", "prompt"}, {"class", "count", "color",
                                                                                      "position"}, {"class", "count"}


@dataclass(frozen=True)
class ObjectRequirement:
    cls: str
    count: int
    colour: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of the earlier include it is relative to)


@dataclass(frozen=True)
class ObjectMetadata:
    """One prompt's requirements (a parsed GenEval metadata line)."""

    tag: str
    prompt: str
    include: tuple[ObjectRequirement, ...]
    exclude: tuple[tuple[str, int], ...] = ()  # (class, count): fewer than count wanted

    @property
    def classes(self) -> list[str]:
        """The detector's object queries: each class once, includes first."""
        return list(dict.fromkeys([r.cls for r in self.include] + [cls for cls, _ in self.exclude]))

    @property
    def coloured_classes(self) -> list[str]:
        return list(dict.fromkeys(r.cls for r in self.include if r.colour))

    def to_json(self) -> str:
        """The line in GenEval's format with sorted keys: what a resumed training run must find unchanged."""
        include = [{"class": r.cls, "count": r.count, **({"color": r.colour} if r.colour else {}),
                    **({"position": list(r.position)} if r.position else {})} for r in self.include]
        line = {"tag": self.tag, "prompt": self.prompt, "include": include,
                **({"exclude": [{"class": c, "count": n} for c, n in self.exclude]} if self.exclude else {})}
        return json.dumps(line, sort_keys=True)


def parse_metadata(line: str, where: str) -> ObjectMetadata:
    """One GenEval metadata line (a JSON object: the line starts with '{') -> ObjectMetadata; anything malformed is a
    ValueError naming `where` (the line)."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem}; a GenEval-style line is one JSON object, e.g. {METADATA_EXAMPLE}")

    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise bad(f"not valid JSON ({err.msg} at column {err.colno})") from err
    if set(raw) - METADATA_KEYS:
        raise bad(f"unknown key(s) {', '.join(sorted(set(raw) - METADATA_KEYS))} (the keys are tag, include, exclude, "
                  "prompt)")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("no 'prompt' (the text the image is generated from)")
    if raw.get("tag") not in TAGS:
        raise bad(f"'tag' is {raw.get('tag')!r}; use one of {', '.join(TAGS)}")
    include, exclude = raw.get("include"), raw.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise bad("'include' must be a non-empty list of objects")
    if not isinstance(exclude, list):
        raise bad("'exclude' must be a list of objects")

    def entry(item, keys: set[str], name: str) -> tuple[str, int]:
        if not isinstance(item, dict):
            raise bad(f"{name} is not an object")
        if set(item) - keys:
            raise bad(f"{name} has unknown key(s) {', '.join(sorted(set(item) - keys))} (its keys are "
                      f"{', '.join(sorted(keys))})")
        cls, count = item.get("class"), item.get("count")
        if not isinstance(cls, str) or not cls.strip():
            raise bad(f"{name} needs a 'class' (an object name such as \"dog\")")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise bad(f"{name} needs a 'count' of at least 1, got {count!r}")
        return cls.strip(), count

    requirements = []
    for i, item in enumerate(include):
        name = f"include {i}"
        cls, count = entry(item, INCLUDE_KEYS, name)
        colour, position = item.get("color"), item.get("position")
        if colour is not None and colour not in COLOURS:
            raise bad(f"{name}: 'color' is {colour!r}; use one of {', '.join(COLOURS)}")
        if position is not None:
            if (not isinstance(position, list) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or isinstance(position[1], bool)
                    or not 0 <= position[1] < i):
                raise bad(f"{name}: 'position' is {position!r}; write [relation, index of an earlier include], the "
                          f"relation one of {', '.join(RELATIONS)}")
            position = (position[0], position[1])
        requirements.append(ObjectRequirement(cls, count, colour, position))
    counted = {r.cls: r.count for r in requirements}
    excluded = []
    for i, item in enumerate(exclude):
        cls, count = entry(item, EXCLUDE_KEYS, f"exclude {i}")
        if counted.get(cls, 0) >= count:
            raise bad(f"exclude {i} asks for fewer than {count} '{cls}' but an include asks for {counted[cls]}")
        excluded.append((cls, count))
    return ObjectMetadata(raw["tag"], prompt.strip(), tuple(requirements), tuple(excluded))


# --- the detector -----------------------------------------------------------------------------------------------

@dataclass
class OWLv2Detector:
    """An Owlv2ForObjectDetection and its Owlv2Processor."""

    model: torch.nn.Module
    processor: object
    device: torch.device = torch.device("cpu")  # where it computes; ComfyUI's device under the host


def load_owlv2(folder: str | Path, dtype: torch.dtype = torch.float32, repo: str = OWLV2_REPO) -> OWLv2Detector:
    """A transformers OWLv2 folder (config.json + model.safetensors, strict keys) with its processor files."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    from .reward_models import check_processor_folder

    folder = Path(folder)
    if not is_owlv2_folder(folder):
        raise CheckpointError(f"{folder} is not a transformers OWLv2 folder (config.json with model_type 'owlv2', "
                              f"model.safetensors); download {repo} from the Hugging Face hub")
    check_processor_folder(folder, repo, "OWLv2")
    weight_files(folder, "model")  # names a missing model.safetensors instead of transformers' generic error
    processor = Owlv2Processor.from_pretrained(str(folder))
    return OWLv2Detector(load_pretrained(Owlv2ForObjectDetection, folder, dtype), processor)


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image
    score: float  # sigmoid of the box's best object-query logit, 0..1
    colour_logits: torch.Tensor | None = None  # [len(COLOUR_QUERIES), len(COLOURS)] for classes with a colour


def detection_queries(metadata: ObjectMetadata) -> tuple[list[str], dict[str, int]]:
    """The text queries (object queries first, one per class, then the colour queries of each coloured class) and
    where each coloured class's colour queries start."""
    texts = [OBJECT_QUERY.format(cls=cls) for cls in metadata.classes]
    colour_start = {}
    for cls in metadata.coloured_classes:
        colour_start[cls] = len(texts)
        texts += [query.format(colour=colour, cls=cls) for query in COLOUR_QUERIES for colour in COLOURS]
    return texts, colour_start


def box_iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of box [4] with each of others [K, 4] (x0, y0, x1, y1)."""
    low, high = torch.maximum(box[:2], others[:, :2]), torch.minimum(box[2:], others[:, 2:])
    inter = (high - low).clamp(min=0).prod(dim=1)
    area = lambda b: (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area(box) + area(others) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(union))


def kept_boxes(boxes: torch.Tensor, scores: torch.Tensor) -> list[int]:
    """Indices of the boxes [K, 4] kept for one class: most confident first, each dropping the later ones it overlaps
    by NMS_IOU or more, at most MAX_OBJECTS."""
    order = scores.argsort(descending=True, stable=True)
    kept = []
    while order.numel() and len(kept) < MAX_OBJECTS:
        best, order = order[0], order[1:]
        kept.append(int(best))
        order = order[box_iou(boxes[best], boxes[order]) < NMS_IOU]
    return kept


@torch.no_grad()
def detect(detector: OWLv2Detector, images: torch.Tensor, metadata: ObjectMetadata,
           threshold: float) -> list[dict[str, list[Detection]]]:
    """For each image [N, H, W, 3] (0..1) of one prompt: class -> its kept detections, most confident first."""
    texts, colour_start = detection_queries(metadata)
    inputs = detector.processor(text=[texts] * len(images), images=[to_pil(image) for image in images],
                                return_tensors="pt", truncation=True)
    outputs = detector.model(input_ids=inputs["input_ids"].to(detector.device),
                             attention_mask=inputs["attention_mask"].to(detector.device),
                             pixel_values=inputs["pixel_values"].to(detector.device, detector.model.dtype))
    logits = outputs.logits.float().cpu()  # [N, patches, queries]
    # boxes are relative to the image padded (bottom / right) to a square of its longer side
    side = max(images.shape[1:3])
    centre, size = outputs.pred_boxes.float().cpu().split(2, dim=-1)
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1) * side
    classes = metadata.classes
    best_logit, label = logits[..., :len(classes)].max(dim=-1)
    scores = best_logit.sigmoid()
    found = []
    for n in range(len(images)):
        per_class = {}
        for c, cls in enumerate(classes):
            patches = ((label[n] == c) & (scores[n] > threshold)).nonzero()[:, 0]
            kept = patches[kept_boxes(boxes[n, patches], scores[n, patches])]
            start = colour_start.get(cls)
            per_class[cls] = [Detection(tuple(boxes[n, p].tolist()), float(scores[n, p]), None if start is None else
                                        logits[n, p, start:start + len(COLOUR_QUERIES) * len(COLOURS)]
                                        .view(len(COLOUR_QUERIES), len(COLOURS))) for p in kept.tolist()]
        found.append(per_class)
    return found


# --- the rules --------------------------------------------------------------------------------------------------

def colour_of(colour_logits: torch.Tensor) -> str:
    """The colour whose queries match best on average: colour_logits [templates, len(COLOURS)]."""
    return COLOURS[int(colour_logits.float().mean(dim=0).argmax())]


def relations(box: tuple, target: tuple) -> set[str]:
    """Where `box` lies relative to `target` (GenEval's rule; y grows downwards): the centres' offset, each axis
    shortened by POSITION_MARGIN x the two boxes' sizes along it, holds a relation when the shortened offset along
    it exceeds half the offset's length; boxes too close on both axes stand in no relation."""
    offset = [(box[i] + box[i + 2] - target[i] - target[i + 2]) / 2 for i in (0, 1)]
    sizes = [abs(box[i + 2] - box[i]) + abs(target[i + 2] - target[i]) for i in (0, 1)]
    shortened = [math.copysign(max(abs(o) - POSITION_MARGIN * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(s) < 1e-3 for s in shortened):
        return set()
    dx, dy = (s / math.hypot(*offset) for s in shortened)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in found.items() if holds}


def requirement_terms(found: dict[str, list[Detection]], metadata: ObjectMetadata) -> list[float]:
    """One term per requirement checked (see the module docstring for which are): at most 1, negative for an
    include when more than twice its count is found."""
    terms, matched = [], []  # matched[i]: include i's detections once it is fully satisfied, else None
    for req in metadata.include:
        objects = found.get(req.cls, [])
        terms.append(1 - abs(req.count - len(objects)) / req.count)  # negative past 2 x count, as Flow-GRPO
        if len(objects) != req.count:
            if req.colour or req.position:
                terms.append(0.0)
            matched.append(None)
            continue
        ok = True
        if req.colour:
            right = sum(colour_of(o.colour_logits) == req.colour for o in objects)
            terms.append(right / req.count)
            ok = right == req.count
        if req.position and ok:  # as Flow-GRPO: a wrong colour leaves the position unscored
            relation, target = req.position
            ok = matched[target] is not None and all(relation in relations(o.box, t.box)
                                                     for o in objects for t in matched[target])
            terms.append(float(ok))  # a failure adds one 0, not Flow-GRPO's 0 and then 1 (module docstring)
        matched.append(objects if ok else None)
    included = {r.cls for r in metadata.include}
    # not in Flow-GRPO (module docstring); never fires on GenEval's lines, whose excludes name an included class
    terms += [float(len(found.get(cls, [])) < count) for cls, count in metadata.exclude if cls not in included]
    return terms


def object_score(found: dict[str, list[Detection]], metadata: ObjectMetadata) -> float:
    terms = requirement_terms(found, metadata)
    return sum(terms) / len(terms)


def object_scores(detector: OWLv2Detector, images: torch.Tensor, metadata: list[ObjectMetadata],
                  score_threshold: float = SCORE_THRESHOLD,
                  counting_threshold: float = COUNTING_THRESHOLD) -> torch.Tensor:
    """The object score of each image [N, H, W, 3] for its prompt's metadata: float32 [N], at most 1, below 0 for
    heavy over-counts (down to -14). Images of the same prompt (a GRPO group) go through the detector together."""
    if len(metadata) != len(images):
        raise ValueError(f"{len(images)} images but {len(metadata)} metadata lines; give one per image")
    scores = torch.zeros(len(images))
    for meta in dict.fromkeys(metadata):
        rows = [i for i, m in enumerate(metadata) if m == meta]
        threshold = counting_threshold if meta.tag == "counting" else score_threshold
        for row, found in zip(rows, detect(detector, images[rows], meta, threshold)):
            scores[row] = object_score(found, meta)
    return scores
