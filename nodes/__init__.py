"""ComfyUI node classes, one module per stage (*_nodes.py), and in host/ their ComfyUI side; the only package
that imports the host (comfy, folder_paths). Node modules import host/ and unipic_core, never each other."""

from .conditioning_nodes import UniPic2EditReference, UniPic2TextEncode
from .host.messages import register_routes
from .loader_nodes import LoadUniPic2Kontext, LoadUniPic2MetaQuery
from .lora_nodes import UniPic2ApplyLoRA, UniPic2LoadLoRA, UniPic2SaveLoRA
from .metaquery_nodes import UniPic2MetaQueryEncode, UniPic2Understand
from .model_nodes import UniPic2KontextReference
from .reward_nodes import (UniPic2AestheticReward, UniPic2CLIPScoreReward, UniPic2ColourReward, UniPic2CombineRewards,
                           UniPic2EditConsistencyReward, UniPic2EditScoreReward, UniPic2JPEGReward, UniPic2JudgeReward,
                           UniPic2ObjectReward, UniPic2PickScoreReward)
from .sampling_nodes import UniPic2FlowSDESampler, UniPic2Sampler, UniPic2Schedule
from .training_nodes import UniPic2EditPairs, UniPic2GRPOTrainer, UniPic2PromptList

register_routes()  # GET /unipic2/messages/<event>?clientId=: that client's training runs (web/ catches up with it)

NODE_CLASS_MAPPINGS = {
    "LoadUniPic2Kontext": LoadUniPic2Kontext,
    "LoadUniPic2MetaQuery": LoadUniPic2MetaQuery,
    "UniPic2MetaQueryEncode": UniPic2MetaQueryEncode,
    "UniPic2Understand": UniPic2Understand,
    "UniPic2TextEncode": UniPic2TextEncode,
    "UniPic2EditReference": UniPic2EditReference,
    "UniPic2Sampler": UniPic2Sampler,
    "UniPic2Schedule": UniPic2Schedule,
    "UniPic2FlowSDESampler": UniPic2FlowSDESampler,
    "UniPic2PromptList": UniPic2PromptList,
    "UniPic2EditPairs": UniPic2EditPairs,
    "UniPic2JPEGReward": UniPic2JPEGReward,
    "UniPic2ColourReward": UniPic2ColourReward,
    "UniPic2EditConsistencyReward": UniPic2EditConsistencyReward,
    "UniPic2JudgeReward": UniPic2JudgeReward,
    "UniPic2PickScoreReward": UniPic2PickScoreReward,
    "UniPic2CLIPScoreReward": UniPic2CLIPScoreReward,
    "UniPic2AestheticReward": UniPic2AestheticReward,
    "UniPic2EditScoreReward": UniPic2EditScoreReward,
    "UniPic2ObjectReward": UniPic2ObjectReward,
    "UniPic2CombineRewards": UniPic2CombineRewards,
    "UniPic2GRPOTrainer": UniPic2GRPOTrainer,
    "UniPic2SaveLoRA": UniPic2SaveLoRA,
    "UniPic2LoadLoRA": UniPic2LoadLoRA,
    "UniPic2ApplyLoRA": UniPic2ApplyLoRA,
    "UniPic2KontextReference": UniPic2KontextReference,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadUniPic2Kontext": "Load UniPic2 Kontext",
    "LoadUniPic2MetaQuery": "Load UniPic2 MetaQuery",
    "UniPic2MetaQueryEncode": "UniPic2 MetaQuery Encode",
    "UniPic2Understand": "UniPic2 Understand",
    "UniPic2TextEncode": "UniPic2 Text Encode",
    "UniPic2EditReference": "UniPic2 Edit Reference",
    "UniPic2Sampler": "UniPic2 Sampler",
    "UniPic2Schedule": "UniPic2 Schedule",
    "UniPic2FlowSDESampler": "UniPic2 Flow-SDE Sampler",
    "UniPic2PromptList": "UniPic2 Prompt List",
    "UniPic2EditPairs": "UniPic2 Edit Pairs",
    "UniPic2JPEGReward": "UniPic2 JPEG Reward",
    "UniPic2ColourReward": "UniPic2 Colour / Brightness Reward",
    "UniPic2EditConsistencyReward": "UniPic2 Edit Consistency Reward",
    "UniPic2JudgeReward": "UniPic2 Judge Reward (Qwen2.5-VL)",
    "UniPic2PickScoreReward": "UniPic2 PickScore Reward",
    "UniPic2CLIPScoreReward": "UniPic2 CLIP Score Reward",
    "UniPic2AestheticReward": "UniPic2 Aesthetic Reward (LAION)",
    "UniPic2EditScoreReward": "UniPic2 EditScore Reward",
    "UniPic2ObjectReward": "UniPic2 Object Reward (GenEval)",
    "UniPic2CombineRewards": "UniPic2 Combine Rewards",
    "UniPic2GRPOTrainer": "UniPic2 GRPO Trainer",
    "UniPic2SaveLoRA": "UniPic2 Save LoRA",
    "UniPic2LoadLoRA": "UniPic2 Load LoRA",
    "UniPic2ApplyLoRA": "UniPic2 Apply LoRA",
    "UniPic2KontextReference": "UniPic2 Kontext Reference",
}
