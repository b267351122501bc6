"""UniPic2 LoRAs in the graph: save, load from models/loras, and apply as removable ModelPatcher weight patches."""

import itertools
import logging
import math
import os
import re

from ..unipic_core.atomic_files import NameTaken
from ..unipic_core.models.lora import LoRAError, check_lora_fits, load_lora, save_lora
from .host import folders, memory

log = logging.getLogger("unipic2")

LORA = ("UNIPIC2_LORA", {"tooltip": "From UniPic2 GRPO Trainer or UniPic2 Load LoRA."})
# Characters some file system cannot hold in a name; '/' separates folders on every system.
_UNSAFE_NAME_CHARACTERS = re.compile(r'[\x00-\x1f<>:"\\|?*]')


def checked_prefix(filename_prefix: str) -> str:
    """filename_prefix as a relative path under models/loras, or a ValueError naming what is wrong."""
    prefix = filename_prefix.strip()

    def refuse(why: str) -> ValueError:
        return ValueError(f"UniPic2 Save LoRA: filename_prefix '{filename_prefix}' {why}; give a path under "
                          "models/loras such as 'unipic2/reward_lora'")

    if not prefix:
        raise refuse("is empty")
    if prefix.startswith("/"):
        raise refuse("is an absolute path")
    if bad := sorted(set(_UNSAFE_NAME_CHARACTERS.findall(prefix))):
        shown = " ".join(c if c.isprintable() else repr(c) for c in bad)
        raise refuse(f"has {shown}, which a file name cannot hold on every system (use '/' between folders)")
    parts = prefix.split("/")
    if ".." in parts:
        raise refuse("has a '..' part (a path that leaves models/loras, or could, is refused)")
    if "" in parts:
        raise refuse("has an empty folder or file name (a '/' at the end, or two in a row)")
    return prefix


def numbered_paths(folder: str, prefix: str):
    """<folder>/<prefix>_00001.safetensors, _00002, ...: each name not taken yet, in order."""
    for n in itertools.count(1):
        path = os.path.join(folder, f"{prefix}_{n:05}.safetensors")
        if not os.path.lexists(path):
            yield path


class UniPic2SaveLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = "Writes the LoRA to models/loras as <prefix>_NNNNN.safetensors (loads in diffusers and ComfyUI)."
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": LORA, "filename_prefix": ("STRING", {"default": "unipic2/reward_lora",
                             "tooltip": "Path under models/loras, without extension; the first free number is "
                                        "appended, so no file is ever replaced."})}}

    def save(self, lora, filename_prefix):
        prefix = checked_prefix(filename_prefix)
        root = os.path.abspath(os.path.dirname(folders.lora_folder()))
        for path in numbered_paths(root, prefix):
            try:
                return {"ui": {"text": [str(save_lora(lora, path, replace=False))]}}
            except NameTaken:
                continue  # another writer took this number while we wrote: the next one


class UniPic2LoadLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = "Loads a UniPic2 (SD3 transformer) LoRA from models/loras."
    RETURN_TYPES = ("UNIPIC2_LORA",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": (folders.lora_files(), {"tooltip": "A .safetensors in models/loras."})}}

    def load(self, lora_name):
        return (load_lora(folders.lora_path(lora_name)),)


class UniPic2ApplyLoRA:
    CATEGORY = "UniPic2/lora"
    DESCRIPTION = ("Applies a UniPic2 LoRA to the MODEL as ComfyUI weight patches, as LoraLoaderModelOnly does, but "
                   "refuses a LoRA that does not fit the model instead of silently skipping its modules.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "A UniPic2 / SD3.5-M MODEL (Load UniPic2 Kontext or "
                                                 "Load Diffusion Model)."}), "lora": LORA,
                             "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                                    "tooltip": "1 = as trained; 0 = the base model exactly."})}}

    def apply(self, model, lora, strength):
        from .host.native_training import lora_targets

        if not math.isfinite(strength):
            raise ValueError(f"UniPic2 Apply LoRA: strength is {strength}; give a finite number (1 = as trained, "
                             "0 = the base model)")
        shapes = {module: target.shape for module, target in lora_targets(model, adapted=None).items()}
        try:
            check_lora_fits(lora, shapes.get)
        except LoRAError as e:
            raise LoRAError(f"UniPic2 Apply LoRA: {e}") from e
        patched, placed = memory.patch_lora(model, lora.tensors, strength)
        if placed != len(lora.modules()):  # the host skips a key it cannot place with a log line only
            raise ValueError(f"UniPic2 Apply LoRA: ComfyUI placed patches for {placed} of the LoRA's "
                             f"{len(lora.modules())} modules; the model's weights are not where the LoRA expects them")
        base, name = lora.info.get("base_model"), memory.checkpoint_name(model)
        if base and name and base != name:
            log.warning("UniPic2 Apply LoRA: LoRA trained on '%s', applied to '%s'", base, name)
        return (patched,)
