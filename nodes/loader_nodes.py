"""Load UniPic2 Kontext: a checkpoint folder (or official repo id) -> model, text encoders, VAE."""

import os
from pathlib import Path

from ..unipic_core.repos import KONTEXT_REPOS, KONTEXT_TRANSFORMER_CLASS
from . import host
from .bundles import UniPic2Model, UniPic2Text, UniPic2VAE

_CACHE: dict[tuple[str, str], tuple] = {}  # (folder, dtype) -> node outputs; most recent only


def _is_kontext_folder(path: str, require_kontext_class: bool) -> bool:
    config = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(config) or not os.path.isdir(os.path.join(path, "text_encoder")):
        return False
    return not require_kontext_class or KONTEXT_TRANSFORMER_CLASS in Path(config).read_text()


def local_checkpoints() -> dict[str, str]:
    """Choice name -> folder: every Kontext folder in models/unipic2/, UniPic2 ones in models/diffusers/."""
    found = {}
    for kind, prefix, strict in (("unipic2", "", False), ("diffusers", "diffusers/", True)):
        for root in host.model_folders(kind):
            if os.path.isdir(root):
                for name in sorted(os.listdir(root)):
                    path = os.path.join(root, name)
                    if _is_kontext_folder(path, strict):
                        found.setdefault(prefix + name, path)
    return found


def resolve_checkpoint(choice: str) -> Path:
    """A local choice, or an official repo id: its models/unipic2/<name> copy, downloaded when absent."""
    local = local_checkpoints()
    if choice in local:
        return Path(local[choice])
    if choice in KONTEXT_REPOS:
        name = choice.split("/")[-1]
        if name in local:
            return Path(local[name])
        from ..unipic_core.loading import download_repo

        return download_repo(choice, Path(host.unipic2_download_folder()) / name)
    raise ValueError(f"UniPic2 Load: checkpoint '{choice}' not found; put a Kontext folder in "
                     f"{host.unipic2_download_folder()} or pick one of {', '.join(KONTEXT_REPOS)}")


class LoadUniPic2Kontext:
    CATEGORY = "UniPic2/loaders"
    DESCRIPTION = "Loads a UniPic2-SD3.5M-Kontext checkpoint (diffusers layout) for text-to-image and editing."
    RETURN_TYPES = ("UNIPIC2_MODEL", "UNIPIC2_TEXT", "UNIPIC2_VAE")
    RETURN_NAMES = ("model", "text_encoders", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        choices = sorted(local_checkpoints()) + list(KONTEXT_REPOS)
        return {"required": {
            "checkpoint": (choices, {"tooltip": "A folder in models/unipic2 (or a UniPic2 folder in "
                                                "models/diffusers), or an official repo id, downloaded on first use."}),
            "dtype": (["auto", "bf16", "fp16", "fp32"], {"default": "auto", "tooltip": "Weight precision. auto: bf16 "
                                                         "on GPUs that support it, fp16 on others, fp32 on the CPU."}),
        }}

    def load(self, checkpoint, dtype):
        folder = resolve_checkpoint(checkpoint)
        torch_dtype = host.pick_dtype(dtype)
        key = (str(folder.resolve()), str(torch_dtype))
        if key not in _CACHE:
            _CACHE.clear()  # free the previous checkpoint before loading the next
            _CACHE[key] = self._load(folder, torch_dtype)
        return _CACHE[key]

    @staticmethod
    def _load(folder: Path, dtype):
        from ..unipic_core.images import fit_latent_to_rgb, vae_scaling
        from ..unipic_core.loading import load_kontext

        parts = load_kontext(folder, dtype)
        shift, scale = vae_scaling(parts.vae)
        model = UniPic2Model(host.wrap(parts.transformer), parts.scheduler_config, shift, scale,
                             fit_latent_to_rgb(parts.vae))
        text = UniPic2Text(parts.text_encoders, [host.wrap(m) for m in parts.text_encoders.modules()])
        return model, text, UniPic2VAE(host.wrap(parts.vae))
