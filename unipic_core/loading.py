"""Load UniPic2 checkpoints from folders in the official diffusers layout, with strict key matching.

A Kontext folder holds transformer/, vae/, scheduler/, text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/ exactly as
released on the Hugging Face hub. Every component goes through its library's own `from_pretrained`, and any
missing or unexpected weight key is an error that names the key -- a silently half-initialised model would
produce plausible-looking garbage.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .kontext_transformer import KontextSD3Transformer
from .repos import KONTEXT_REPOS
from .text_encoding import SD3TextEncoders

log = logging.getLogger("unipic2")

KONTEXT_LAYOUT = "transformer/, vae/, scheduler/, text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/"
REQUIRED_FILES = ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                  "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/", "tokenizer_2/")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the fix."""


@dataclass
class KontextComponents:
    transformer: KontextSD3Transformer
    vae: AutoencoderKL
    text_encoders: SD3TextEncoders
    scheduler_config: dict


def check_kontext_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; expected a diffusers folder with {KONTEXT_LAYOUT}")
    for name in REQUIRED_FILES:
        if not (folder / name).exists():
            raise CheckpointError(f"'{name}' not found in {folder} -- expected a diffusers folder with "
                                  f"{KONTEXT_LAYOUT}, as in {KONTEXT_REPOS[0]} on the Hugging Face hub")


def check_safetensors(component: Path) -> None:
    """Open every .safetensors header in a component folder; a truncated or corrupt file fails here, named."""
    for path in sorted(component.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f"{path} is corrupt or truncated ({err}); download it again") from err


def _strict(result, component: Path):
    """Unpack a from_pretrained(..., output_loading_info=True) result, failing on any key mismatch."""
    model, info = result
    problems = [f"{kind.replace('_', ' ')}: {', '.join(sorted(map(str, info[kind]))[:10])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise CheckpointError(f"{component}: weights do not match the model config -- {'; '.join(problems)}. "
                              f"Is this folder an unmodified UniPic2 checkpoint?")
    return model


def load_pretrained(cls, component: Path, dtype: torch.dtype):
    """cls.from_pretrained on a component folder with corrupt-file checks and strict key matching."""
    if not (component / "config.json").exists():
        raise CheckpointError(f"'{component.name}/config.json' not found in {component.parent}")
    check_safetensors(component)
    try:
        result = cls.from_pretrained(str(component), torch_dtype=dtype, output_loading_info=True)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{component}: could not load {cls.__name__} ({err})") from err
    return _strict(result, component).eval().requires_grad_(False)


def load_scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is missing or not valid JSON ({err})") from err


def load_text_encoders(folder: Path, dtype: torch.dtype, joint_dim: int) -> SD3TextEncoders:
    has_t5 = (folder / "text_encoder_3" / "config.json").exists()
    if not has_t5:
        log.warning("UniPic2: %s has no text_encoder_3 (T5); its tokens are replaced by zeros", folder)
    return SD3TextEncoders(
        clip_l=load_pretrained(CLIPTextModelWithProjection, folder / "text_encoder", dtype),
        tokenizer_l=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        clip_g=load_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2", dtype),
        tokenizer_g=CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2")),
        t5=load_pretrained(T5EncoderModel, folder / "text_encoder_3", dtype) if has_t5 else None,
        tokenizer_t5=T5TokenizerFast.from_pretrained(str(folder / "tokenizer_3")) if has_t5 else None,
        joint_dim=joint_dim,
    )


def load_kontext(folder: str | Path, dtype: torch.dtype = torch.float32) -> KontextComponents:
    """Load every component of a Kontext folder on the CPU in `dtype`."""
    folder = Path(folder)
    check_kontext_folder(folder)
    log.info("UniPic2: loading Kontext checkpoint %s (%s)", folder, dtype)
    transformer = load_pretrained(KontextSD3Transformer, folder / "transformer", dtype)
    return KontextComponents(
        transformer=transformer,
        vae=load_pretrained(AutoencoderKL, folder / "vae", dtype),
        text_encoders=load_text_encoders(folder, dtype, transformer.config.joint_attention_dim),
        scheduler_config=load_scheduler_config(folder),
    )


def download_repo(repo_id: str, destination: Path) -> Path:
    """Download a hub repo into `destination` (tqdm progress on the console); a clear error when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("UniPic2: downloading %s into %s", repo_id, destination)
    try:
        snapshot_download(repo_id, local_dir=str(destination))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not download {repo_id} ({type(err).__name__}: {err}). Without internet access, download it "
            f"elsewhere (huggingface-cli download {repo_id}) and copy the folder to {destination}") from err
    return destination
