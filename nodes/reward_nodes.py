"""Reward nodes: each outputs a UNIPIC2_REWARD for the GRPO Trainer; Combine Rewards weights several. The learned
rewards (PickScore, CLIP score, aesthetic, the GenEval-style object reward) load their models from models/unipic2 or
the hub, each under its own ModelPatcher, so ComfyUI moves them in and out of VRAM around the DiT; EditScore is a
LoRA on the MetaQuery's MLLM, a patched clone of its ModelPatcher (one copy of the 7B weights)."""

from pathlib import Path

from ..unipic_core import rewards
from ..unipic_core.models.folders import is_clip_folder, is_clip_processor_folder, is_owlv2_folder
from ..unipic_core.models.repos import (AESTHETIC_CHOICE, AESTHETIC_URL, CLIP_FILES, CLIP_L14_REPO, EDITSCORE_FILES,
                                        EDITSCORE_REPO, OWLV2_FILES, OWLV2_REPO, PICKSCORE_PROCESSOR_REPO,
                                        PICKSCORE_REPO, PROCESSOR_FILES)
from .host import folders, memory, progress

CATEGORY = "UniPic2/training/rewards"


class UniPic2JPEGReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Flow-GRPO's JPEG reward: compressibility (-kB at quality 95, favours simple images) or "
                   "incompressibility (+kB, favours detail).")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mode": (["compressibility", "incompressibility"], {"tooltip": "Which way to push."})}}

    def make(self, mode):
        return (rewards.jpeg_reward(incompressible=mode == "incompressibility"),)


class UniPic2ColourReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("1 - mean |pixel - target colour|. White (1, 1, 1), the default, is a brightness reward; "
                   "black a darkness reward.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        channel = lambda name: ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": f"Target {name} in 0..1."})
        return {"required": {"red": channel("red"), "green": channel("green"), "blue": channel("blue")}}

    def make(self, red, green, blue):
        return (rewards.colour_reward((red, green, blue)),)


class UniPic2EditConsistencyReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("For edit training: 1 - distance to the source image outside the mask (the region the edit may "
                   "change), so edits keep the rest of the picture.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"metric": (list(rewards.EDIT_METRICS), {"tooltip": "l1: mean absolute difference; "
                                                                     "l2: mean squared difference."})},
                "optional": {"mask": ("MASK", {"tooltip": "1 where the edit may change the image (not scored)."})}}

    def make(self, metric, mask=None):
        return (rewards.edit_consistency_reward(metric, mask),)


class UniPic2JudgeReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Asks the loaded Qwen2.5-VL whether each image satisfies its prompt (or, for editing, whether "
                   "the edit follows the instruction); the reward is P(yes). ComfyUI moves the MLLM in and out of "
                   "VRAM around the DiT.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mllm": ("UNIPIC2_MLLM", {"tooltip": "From Load UniPic2 MetaQuery."})}}

    def make(self, mllm):
        from ..unipic_core.models.metaquery import yes_probability

        def probability_of_yes(images, question):
            return yes_probability(mllm.mllm_on_device(), images, question)

        return (rewards.judge_reward(probability_of_yes),)


class UniPic2CombineRewards:
    CATEGORY = CATEGORY
    DESCRIPTION = ("A weighted sum of rewards; the trainer reports each term separately. Any input may be another "
                   "Combine Rewards' output, so chaining combines any number of rewards.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        weight = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05, "tooltip": "Multiplies this reward."}
        reward = ("UNIPIC2_REWARD", {"tooltip": "A reward, or another Combine Rewards' output (its terms keep their "
                                                "weights, times this one)."})
        return {"required": {"reward_1": reward, "weight_1": ("FLOAT", weight)},
                "optional": {"reward_2": reward, "weight_2": ("FLOAT", weight),
                             "reward_3": reward, "weight_3": ("FLOAT", weight)}}

    def combine(self, reward_1, weight_1, reward_2=None, weight_2=1.0, reward_3=None, weight_3=1.0):
        pairs = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2), (reward_3, weight_3)) if r is not None]
        return (rewards.combine(pairs),)


REWARD_DTYPE = (["fp32", "bf16", "fp16"], {"default": "fp32", "tooltip": (
    "The reward model's precision. fp32 (default) scores most exactly: a group's images often differ by little, "
    "and bf16/fp16 rounding (half the memory) can blur that.")})
_LOADED: dict[str, dict] = {}  # reward kind -> its most recent model, as the loaders cache checkpoints


def unipic2_entries(accept) -> dict[str, Path]:
    """The folders (or files) in models/unipic2 that accept(path) recognises, by their listed name."""
    return folders.local_folders((folders.UNIPIC2_FOLDER,), lambda path, kind: accept(path))


def clip_folders():
    return unipic2_entries(is_clip_folder)


def processor_folders():
    return unipic2_entries(is_clip_processor_folder)


def aesthetic_files():
    return unipic2_entries(lambda path: path.suffix in (".pth", ".safetensors") and path.is_file())


def hub_files(patterns: tuple[str, ...]):
    """Download only these files of a hub repo: its weights in one format, not all of them."""
    from ..unipic_core.models.loading import download_repo

    return lambda repo, destination: download_repo(repo, destination, progress.download_progress(), patterns)


def load_clip(kind: str, choice: str, repo: str, dtype: str, processor_choice: str | None = None):
    """(CLIPReward on ComfyUI's device, its ModelPatcher) for a model choice, with the processor of the model's
    folder, or of PickScore's processor input (laion's CLIP-H processor by default)."""
    from ..unipic_core.rewards.reward_models import load_clip_reward

    folder = folders.resolve(choice, clip_folders(), (repo,), "model", hub_files(CLIP_FILES))
    processor = None
    if processor_choice is not None:
        processor = folders.resolve(processor_choice, processor_folders(), (PICKSCORE_PROCESSOR_REPO,),
                                    "processor", hub_files(PROCESSOR_FILES))

    def load():
        clip = load_clip_reward(folder, processor, memory.DTYPES[dtype], repo, PICKSCORE_PROCESSOR_REPO)
        clip.device = memory.device()
        return clip, memory.wrap(clip.model)

    key = (str(folder.resolve()), str(processor.resolve()) if processor else "", dtype)
    return memory.cached(key, load, _LOADED.setdefault(kind, {}))


def model_reward(name: str, detail: str, patchers: list, score, needs_sources: bool = False,
                 needs_metadata: bool = False) -> rewards.Reward:
    """One reward term scoring once ComfyUI has put the model(s) on the device, with score(images, prompts) followed
    by what the term needs: the edit sources (needs_sources; the reward refuses to score without them), then the
    prompts' metadata (needs_metadata) -- e.g. score(images, prompts, sources) or score(images, prompts, metadata)."""

    def scored(images, prompts, sources, *metadata):  # Reward.score passes metadata to needs_metadata terms only
        memory.load_on_device(*patchers)
        return score(images, prompts, *((sources,) if needs_sources else ()), *metadata)

    return rewards.Reward([rewards.RewardTerm(name, 1.0, scored, needs_sources, needs_metadata, detail)])


class UniPic2PickScoreReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("PickScore (Pick-a-Pic's human-preference model, a fine-tuned CLIP-H): logit scale x cosine of "
                   "the prompt's and the image's embeddings, about 18..24. For text-to-image RL; 1 B weights (3.9 GB "
                   "in fp32).")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ([PICKSCORE_REPO] + sorted(clip_folders()), {"tooltip": "yuvalkirstain/PickScore_v1 (downloaded "
                      "into models/unipic2 on first use) or a CLIP folder there (config.json, model.safetensors)."}),
            "processor": ([PICKSCORE_PROCESSOR_REPO] + sorted(processor_folders()), {"tooltip": "PickScore reads "
                          "images and prompts with laion's CLIP-H processor (its processor files only are "
                          "downloaded), or a folder with CLIP processor files."}),
            "dtype": REWARD_DTYPE,
        }}

    def make(self, model, processor, dtype):
        from ..unipic_core.rewards.reward_models import pickscore

        clip, patcher = load_clip("pickscore", model, PICKSCORE_REPO, dtype, processor)
        return (model_reward("pickscore", f"{model} with {processor}, {dtype}", [patcher],
                             lambda images, prompts: pickscore(clip, images, prompts)),)


class UniPic2CLIPScoreReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("CLIPScore (Hessel et al.): 2.5 x max(cosine, 0) of the image's and \"A photo depicts <prompt>\"'s "
                   "CLIP embeddings, 0..2.5 (typically 0.5..1). How well the image matches its prompt.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ([CLIP_L14_REPO] + sorted(clip_folders()), {"tooltip": "A CLIP folder in models/unipic2 with its "
                      "processor files, or openai/clip-vit-large-patch14 (downloaded there on first use)."}),
            "dtype": REWARD_DTYPE,
        }}

    def make(self, model, dtype):
        from ..unipic_core.rewards.reward_models import clip_score

        clip, patcher = load_clip("clipscore", model, CLIP_L14_REPO, dtype)
        return (model_reward("clipscore", f"{model}, {dtype}", [patcher],
                             lambda images, prompts: clip_score(clip, images, prompts)),)


class UniPic2AestheticReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("LAION's improved aesthetic predictor: an MLP on the CLIP ViT-L/14 image embedding rating how "
                   "much people like an image, about 1..10. Ignores the prompt.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ([CLIP_L14_REPO] + sorted(clip_folders()), {"tooltip": "The CLIP the MLP was trained on: "
                     "openai/clip-vit-large-patch14 (downloaded into models/unipic2 on first use) or its folder."}),
            "mlp": ([AESTHETIC_CHOICE] + sorted(aesthetic_files()), {"tooltip": "sac+logos+ava1-l14-linearMSE.pth "
                    "from the predictor's GitHub repository (downloaded into models/unipic2 on first use), or a "
                    ".pth / .safetensors file there with the same keys."}),
            "dtype": REWARD_DTYPE,
        }}

    def make(self, clip, mlp, dtype):
        from ..unipic_core.models.loading import download_file
        from ..unipic_core.rewards.reward_models import aesthetic_score, check_aesthetic_pair, load_aesthetic_mlp

        clip_model, clip_patcher = load_clip("aesthetic", clip, CLIP_L14_REPO, dtype)
        path = folders.resolve(mlp, aesthetic_files(), (AESTHETIC_CHOICE,), "aesthetic MLP",
                               lambda choice, destination: download_file(AESTHETIC_URL, destination,
                                                                         progress.download_progress()))

        def load():
            head = load_aesthetic_mlp(path)
            check_aesthetic_pair(clip_model, head, clip, mlp)
            return head, memory.wrap(head)

        head, head_patcher = memory.cached((str(path.resolve()), clip, dtype), load,
                                           _LOADED.setdefault("aesthetic-mlp", {}))
        return (model_reward("aesthetic", f"{mlp} on {clip}, {dtype}", [clip_patcher, head_patcher],
                             lambda images, prompts: aesthetic_score(clip_model, head, images)),)


def adapter_folders():
    from ..unipic_core.models.qwen25vl_lora import is_adapter_folder

    return unipic2_entries(is_adapter_folder)


class UniPic2EditScoreReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("EditScore (VectorSpaceLab): the MetaQuery's Qwen2.5-VL-7B with the EditScore-7B LoRA rates each "
                   "edit against its source and instruction, as in EditScore's RL reward: sqrt(instruction-following "
                   "x perceptual quality) / 10, about 0..1. For edit training (edit pairs). Costly: per edited image "
                   "and pass, two sampled answers of up to 512 tokens (typically ~100) from the 7B. The LoRA patches "
                   "the loaded MLLM's weights while it scores (no second copy); ComfyUI swaps it with the DiT.")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mllm": ("UNIPIC2_MLLM", {"tooltip": "From Load UniPic2 MetaQuery: Qwen2.5-VL-7B-Instruct, which "
                     "EditScore-7B was trained on (its output layer is needed)."}),
            "adapter": ([EDITSCORE_REPO] + sorted(adapter_folders()), {"tooltip": "EditScore/EditScore-7B (its "
                        "adapter files are downloaded into models/unipic2 on first use), or a peft LoRA folder there "
                        "(adapter_config.json, adapter_model.safetensors)."}),
            "passes": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "EditScore's self-ensembling (num_pass): "
                       "the mean of this many sampled judgements. Each pass costs two 7B answers per image; their "
                       "RL runs use 1, their stronger setting 4."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1, "tooltip": "Pass n samples with seed + n "
                     "(EditScore's default 42), so a score repeats exactly."}),
        }}

    def make(self, mllm, adapter, passes, seed):
        from ..unipic_core.models.qwen25vl import MissingOutputLayer
        from ..unipic_core.models.qwen25vl_lora import read_qwen25vl_lora
        from ..unipic_core.rewards.editscore import editscore

        encoder = mllm.encoder
        if isinstance(encoder.mllm.lm_head, MissingOutputLayer):
            raise ValueError(f"UniPic2 EditScore Reward: 'mllm' was loaded from {encoder.mllm.lm_head.path.name}, "
                             "which has no output layer (lm_head), and EditScore answers in words. In Load UniPic2 "
                             "MetaQuery choose the Qwen2.5-VL-7B-Instruct folder (or repo id) as its mllm")
        folder = folders.resolve(adapter, adapter_folders(), (EDITSCORE_REPO,), "adapter", hub_files(EDITSCORE_FILES))

        def load():
            return memory.patch_component_lora(mllm.mllm_patcher, read_qwen25vl_lora(folder, encoder.mllm,
                                                                                    EDITSCORE_REPO))

        # keyed by the MLLM module too: a reloaded MetaQuery needs its own clone; the cache holds the module alive
        patcher = memory.cached((str(folder.resolve()), id(encoder.mllm)), load,
                                _LOADED.setdefault("editscore", {}))

        def score(images, prompts, sources):
            return editscore(encoder, sources, images, prompts, passes, seed).rewards

        detail = f"{adapter} on {mllm.source}, {passes} pass(es), seed {seed}"
        return (model_reward("editscore", detail, [patcher], score, needs_sources=True),)


def owlv2_folders():
    return unipic2_entries(is_owlv2_folder)


class UniPic2ObjectReward:
    CATEGORY = CATEGORY
    DESCRIPTION = ("GenEval-style object reward: OWLv2, a zero-shot detector, checks the objects each prompt asks for "
                   "-- presence, exact count, colour, left/right/above/below -- and the reward is the share of "
                   "requirements met (Flow-GRPO's GenEval reward: at most 1, below 0 when far more objects are found "
                   "than asked). Needs GenEval-style lines in UniPic2 Prompt "
                   "List. One detector pass per image at 960 px (OWLv2-B/16, 155 M weights, 0.6 GB in fp32).")
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        from ..unipic_core.rewards.object_reward import COUNTING_THRESHOLD, SCORE_THRESHOLD

        threshold = lambda default, text: ("FLOAT", {"default": default, "min": 0.01, "max": 0.99, "step": 0.01,
                                                     "tooltip": text})
        return {"required": {
            "detector": ([OWLV2_REPO] + sorted(owlv2_folders()), {"tooltip": "google/owlv2-base-patch16-ensemble "
                         "(downloaded into models/unipic2 on first use, 0.6 GB) or an OWLv2 folder there (config.json, "
                         "model.safetensors and its processor files)."}),
            "score_threshold": threshold(SCORE_THRESHOLD, "A detection counts as an object above this confidence "
                                         "(0.1 as in transformers' OWLv2 example; not yet validated on generated "
                                         "images). Higher: fewer false objects, more missed ones."),
            "counting_threshold": threshold(COUNTING_THRESHOLD, "The same for 'counting' lines. Raise it if "
                                            "half-seen or false extra objects break exact counts (GenEval uses a "
                                            "stricter one for its own detector)."),
            "dtype": REWARD_DTYPE,
        }}

    def make(self, detector, score_threshold, counting_threshold, dtype):
        from ..unipic_core.rewards.object_reward import load_owlv2, object_scores

        folder = folders.resolve(detector, owlv2_folders(), (OWLV2_REPO,), "detector", hub_files(OWLV2_FILES))

        def load():
            owl = load_owlv2(folder, memory.DTYPES[dtype])
            owl.device = memory.device()
            return owl, memory.wrap(owl.model)

        owl, patcher = memory.cached((str(folder.resolve()), dtype), load, _LOADED.setdefault("object", {}))

        detail = f"{detector}, thresholds {score_threshold:g}/{counting_threshold:g}, {dtype}"
        return (model_reward("objects", detail, [patcher], lambda images, prompts, metadata: object_scores(
                owl, images, metadata, score_threshold, counting_threshold), needs_metadata=True),)
