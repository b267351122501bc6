"""Reward nodes: each outputs a UNIPIC2_REWARD for the GRPO Trainer; Combine Rewards weights several."""

from ..unipic_core import rewards
from . import host

CATEGORY = "UniPic2/training/rewards"
REWARD = ("UNIPIC2_REWARD", {"tooltip": "A reward node's output."})


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
        from ..unipic_core.metaquery import yes_probability

        def probability_of_yes(images, question):
            host.load_on_device(mllm.mllm_patcher)
            return yes_probability(mllm.encoder, images, question)

        return (rewards.judge_reward(probability_of_yes),)


class UniPic2CombineRewards:
    CATEGORY = CATEGORY
    DESCRIPTION = "A weighted sum of up to three rewards; the trainer reports each term separately."
    RETURN_TYPES = ("UNIPIC2_REWARD",)
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        weight = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05, "tooltip": "Multiplies this reward."}
        return {"required": {"reward_1": REWARD, "weight_1": ("FLOAT", weight)},
                "optional": {"reward_2": REWARD, "weight_2": ("FLOAT", weight),
                             "reward_3": REWARD, "weight_3": ("FLOAT", weight)}}

    def combine(self, reward_1, weight_1, reward_2=None, weight_2=1.0, reward_3=None, weight_3=1.0):
        pairs = [(r, w) for r, w in ((reward_1, weight_1), (reward_2, weight_2), (reward_3, weight_3)) if r is not None]
        return (rewards.combine(pairs),)
