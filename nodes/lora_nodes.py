"""UniPic2 LoRAs in the graph: save, load from models/loras, and apply as removable ModelPatcher weight patches."""

import dataclasses
import os

from ..unipic_core.lora import LoRAWeights, PREFIX, load_lora, save_lora
from . import host

LORA = ("UNIPIC2_LORA", {"tooltip": "From UniPic2 GRPO Trainer or UniPic2 Load LoRA."})


def next_free_path(folder: str, prefix: str) -> str:
    """<folder>/<prefix>_00001.safetensors, the first number not taken (never overwrites)."""
    n = 1
    while os.path.exists(path := os.path.join(folder, f"{prefix}_{n:05}.safetensors")):
        n += 1
    return path


class UniPic2SaveLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = "Writes the LoRA to models/loras as <prefix>_NNNNN.safetensors (loads in diffusers and ComfyUI)."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": LORA, "filename_prefix": ("STRING", {"default": "unipic2/reward_lora",
                             "tooltip": "Path under models/loras, without extension; a number is appended."})}}

    def save(self, lora, filename_prefix):
        root = os.path.dirname(host.lora_folder())
        path = os.path.abspath(next_free_path(root, filename_prefix))
        if not path.startswith(os.path.abspath(root) + os.sep):
            raise ValueError(f"UniPic2 Save LoRA: filename_prefix '{filename_prefix}' leaves models/loras")
        save_lora(lora, path)
        return {"ui": {"text": [path]}}


class UniPic2LoadLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = "Loads a UniPic2 (SD3 transformer) LoRA from models/loras."
    RETURN_TYPES = ("UNIPIC2_LORA",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (host.lora_files(), {"tooltip": "A .safetensors in models/loras."})}}

    def load(self, lora_name):
        return (load_lora(host.lora_path(lora_name)),)


def host_lora(lora: LoRAWeights) -> tuple[dict, dict]:
    """(tensors under kohya names, key map to our ModelPatcher keys): the form every host's load_lora reads."""
    tensors, key_map = {}, {}
    for module in lora.modules():
        down, up = lora.pair(module)
        tensors[f"{PREFIX}{module}.lora_down.weight"] = down
        tensors[f"{PREFIX}{module}.lora_up.weight"] = up
        key_map[PREFIX + module] = f"module.{module}.weight"  # the Component holder's prefix
    return tensors, key_map


class UniPic2ApplyLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = ("Applies a LoRA to the UniPic2 model as ComfyUI weight patches: adjustable strength, nothing "
                   "rebuilt, and the unpatched model stays available to other branches of the graph.")
    RETURN_TYPES = ("UNIPIC2_MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("UNIPIC2_MODEL", {"tooltip": "From a UniPic2 loader."}), "lora": LORA,
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                                    "tooltip": "1 = as trained; 0 = the base model exactly."})}}

    def apply(self, model, lora, strength):
        tensors, key_map = host_lora(lora)
        patcher, patched = host.patch_lora(model.patcher, tensors, key_map, strength)
        missing = sorted(set(key_map.values()) - patched)
        if missing:
            raise ValueError(f"UniPic2 Apply LoRA: {len(missing)} LoRA module(s) do not exist in this model (first: "
                             f"{missing[0][len('module.'):]}); the LoRA was made for another architecture")
        base = lora.info.get("base_model")
        if base and model.name and base != model.name:
            host.log.warning("UniPic2 Apply LoRA: LoRA trained on '%s', applied to '%s'", base, model.name)
        return (dataclasses.replace(model, patcher=patcher),)
