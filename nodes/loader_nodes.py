"""Loaders: a checkpoint folder (or official repo id) -> the pack's model bundles, cached by (folders, dtype)."""

from pathlib import Path

from ..unipic_core import folders
from ..unipic_core.repos import KONTEXT_REPOS, METAQUERY_REPOS, QWEN_REPO
from . import host
from .bundles import UniPic2MLLM, UniPic2Model, UniPic2Text, UniPic2VAE

INSIDE = "(inside the checkpoint)"
DTYPE_INPUT = (["auto", "bf16", "fp16", "fp32"], {"default": "auto", "tooltip": "Weight precision. auto: bf16 on GPUs "
                                                  "that support it, fp16 on others, fp32 on the CPU."})
_CACHE: dict[tuple, tuple] = {}  # (kind, folders, dtype) -> node outputs; the most recent load only


def local_folders(kinds: tuple[str, ...], accept) -> dict[str, Path]:
    """Choice name -> folder for each subfolder of the registered model folders that `accept(path, kind)` takes;
    folders outside models/unipic2 are named '<kind>/<name>'."""
    found = {}
    for kind in kinds:
        for root in map(Path, host.model_folders(kind)):
            if root.is_dir():
                for path in sorted(root.iterdir()):
                    if accept(path, kind):
                        found.setdefault(path.name if kind == host.UNIPIC2_FOLDER else f"{kind}/{path.name}", path)
    return found


def kontext_folders() -> dict[str, Path]:
    return local_folders(("unipic2", "diffusers"), lambda p, kind: folders.is_kontext_folder(p, kind == "diffusers"))


def metaquery_folders() -> dict[str, Path]:
    return local_folders(("unipic2", "diffusers"), lambda p, kind: folders.is_metaquery_folder(p))


def qwen_folders() -> dict[str, Path]:
    return local_folders(("unipic2", "LLM"), lambda p, kind: folders.is_qwen25vl_folder(p))


def resolve(choice: str, local: dict[str, Path], repos: tuple[str, ...], what: str) -> Path:
    """A local choice, or an official repo id: its models/unipic2/<name> copy, downloaded when absent."""
    if choice in local:
        return local[choice]
    if choice in repos:
        name = choice.split("/")[-1]
        if name in local:
            return local[name]
        from ..unipic_core.loading import download_repo

        return download_repo(choice, Path(host.unipic2_download_folder()) / name, host.download_progress())
    raise ValueError(f"UniPic2 Load: {what} '{choice}' not found; put the folder in "
                     f"{host.unipic2_download_folder()} or pick one of {', '.join(repos)}")


def cached(key: tuple, load):
    if key not in _CACHE:
        _CACHE.clear()  # free the previous checkpoint before loading the next
        _CACHE[key] = load()
    return _CACHE[key]


def dit_bundle(transformer, vae, scheduler_config, name: str) -> tuple[UniPic2Model, UniPic2VAE]:
    from ..unipic_core.images import fit_latent_to_rgb, vae_scaling

    shift, scale = vae_scaling(vae)
    model = UniPic2Model(host.wrap(transformer), scheduler_config, shift, scale, fit_latent_to_rgb(vae), name)
    return model, UniPic2VAE(host.wrap(vae))


class LoadUniPic2Kontext:
    CATEGORY = "UniPic2/loaders"
    DESCRIPTION = "Loads a UniPic2-SD3.5M-Kontext checkpoint (diffusers layout) for text-to-image and editing."
    RETURN_TYPES = ("UNIPIC2_MODEL", "UNIPIC2_TEXT", "UNIPIC2_VAE")
    RETURN_NAMES = ("model", "text_encoders", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(kontext_folders()) + list(KONTEXT_REPOS), {"tooltip": "A folder in models/unipic2 "
                           "(or a UniPic2 folder in models/diffusers), or an official repo id, downloaded on first use."}),
            "dtype": DTYPE_INPUT,
        }}

    def load(self, checkpoint, dtype):
        folder = resolve(checkpoint, kontext_folders(), KONTEXT_REPOS, "checkpoint")
        torch_dtype = host.pick_dtype(dtype)
        return cached(("kontext", str(folder.resolve()), str(torch_dtype)), lambda: self._load(folder, torch_dtype))

    @staticmethod
    def _load(folder: Path, dtype):
        from ..unipic_core.loading import load_kontext

        parts = load_kontext(folder, dtype)
        model, vae = dit_bundle(parts.transformer, parts.vae, parts.scheduler_config, folder.name)
        text = UniPic2Text(parts.text_encoders, [host.wrap(m) for m in parts.text_encoders.modules()])
        return model, text, vae


class LoadUniPic2MetaQuery:
    CATEGORY = "UniPic2/loaders"
    DESCRIPTION = ("Loads UniPic2-MetaQuery: Qwen2.5-VL-7B + connector conditioning the Kontext DiT, for generation, "
                   "editing and image understanding. Needs ~16 GB (bf16) for the MLLM, which ComfyUI offloads "
                   "before sampling when VRAM is short.")
    RETURN_TYPES = ("UNIPIC2_MODEL", "UNIPIC2_MLLM", "UNIPIC2_VAE")
    RETURN_NAMES = ("model", "mllm", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(metaquery_folders()) + list(METAQUERY_REPOS), {"tooltip": "A MetaQuery folder "
                           "(transformer/, vae/, scheduler/, conditioner/) in models/unipic2, or an official repo id."}),
            "mllm": ([INSIDE] + sorted(qwen_folders()) + [QWEN_REPO], {"tooltip": "The Qwen2.5-VL-7B-Instruct folder: "
                     "the one inside the checkpoint, one in models/unipic2 or models/LLM, or the repo id."}),
            "dtype": DTYPE_INPUT,
        }}

    def load(self, checkpoint, mllm, dtype):
        folder = resolve(checkpoint, metaquery_folders(), METAQUERY_REPOS, "checkpoint")
        if mllm == INSIDE:
            qwen = folders.find_qwen_inside(folder)
            if qwen is None:
                raise ValueError(f"UniPic2 Load MetaQuery: {folder} holds no Qwen2.5-VL folder; choose the MLLM "
                                 f"(a folder in models/LLM or models/unipic2, or {QWEN_REPO})")
        else:
            qwen = resolve(mllm, qwen_folders(), (QWEN_REPO,), "MLLM")
        torch_dtype = host.pick_dtype(dtype)
        key = ("metaquery", str(folder.resolve()), str(qwen.resolve()), str(torch_dtype))
        return cached(key, lambda: self._load(folder, qwen, torch_dtype))

    @staticmethod
    def _load(folder: Path, qwen: Path, dtype):
        from ..unipic_core.loading import load_metaquery

        parts = load_metaquery(folder, qwen, dtype)
        model, vae = dit_bundle(parts.transformer, parts.vae, parts.scheduler_config, folder.name)
        mllm = UniPic2MLLM(parts.mllm, host.wrap(parts.mllm.mllm), host.wrap(parts.mllm.conditioner))
        return model, mllm, vae
