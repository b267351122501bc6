"""Load UniPic2 checkpoints from folders in the official diffusers layout, with strict key matching.

A Kontext folder holds transformer/, vae/, scheduler/, text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/ exactly as
released on the Hugging Face hub. Every component goes through its library's own `from_pretrained`, and any
missing or unexpected weight key is an error that names the key -- a silently half-initialised model would
produce plausible-looking garbage.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import (AutoProcessor, CLIPTextModelWithProjection, CLIPTokenizer, Qwen2_5_VLForConditionalGeneration,
                          T5EncoderModel, T5TokenizerFast)

from .conditioner import MetaQueryConditioner
from .folders import find_qwen_inside, is_qwen25vl_folder
from .kontext_transformer import KontextSD3Transformer
from .metaquery import MetaQueryMLLM
from .repos import KONTEXT_REPOS, METAQUERY_REPOS, QWEN_REPO
from .text_encoding import SD3TextEncoders

log = logging.getLogger("unipic2")

KONTEXT_LAYOUT = "transformer/, vae/, scheduler/, text_encoder{,_2,_3}/ and tokenizer{,_2,_3}/"
METAQUERY_LAYOUT = "transformer/, vae/, scheduler/ and conditioner/"
METAQUERY_FILES = ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                   "conditioner/config.json")
KONTEXT_FILES = ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/", "tokenizer_2/")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the fix."""


@dataclass
class KontextComponents:
    transformer: KontextSD3Transformer
    vae: AutoencoderKL
    text_encoders: SD3TextEncoders
    scheduler_config: dict


def check_folder(folder: Path, required: tuple[str, ...], layout: str, example_repo: str) -> None:
    """Raise a CheckpointError naming the first missing file and the expected layout."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; expected a diffusers folder with {layout}")
    for name in required:
        if not (folder / name).exists():
            raise CheckpointError(f"'{name}' not found in {folder} -- expected a diffusers folder with "
                                  f"{layout}, as in {example_repo} on the Hugging Face hub")


def check_safetensors_file(path: Path) -> None:
    """Open a .safetensors header; a truncated or corrupt file fails here, named."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path} is corrupt or truncated ({err}); download it again") from err


def check_safetensors(component: Path) -> None:
    """Open every .safetensors header in a component folder; a truncated or corrupt file fails here, named."""
    for path in sorted(component.glob("*.safetensors")):
        check_safetensors_file(path)


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is missing or not valid JSON ({err})") from err


def weight_files(component: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors file(s) of a component folder: `stem`.safetensors, or the shards its index json names."""
    single = component / f"{stem}.safetensors"
    if single.exists():
        return [single]
    index = component / f"{stem}.safetensors.index.json"
    if not index.exists():
        raise CheckpointError(f"'{component.name}/{single.name}' (or its sharded '{index.name}') not found in "
                              f"{component.parent} -- copy the {component.name}/ folder of the official checkpoint")
    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
    missing = [name for name in shards if not (component / name).exists()]
    if not shards or missing:
        raise CheckpointError(f"{index} names shard(s) {', '.join(missing) or '(none)'} that are not in "
                              f"{component} -- download the missing files again")
    return [component / name for name in shards]


def read_weights(component: Path, stem: str = "diffusion_pytorch_model") -> dict[str, torch.Tensor]:
    """Every tensor of a component folder (official key names, one or several shards) on the CPU."""
    from safetensors.torch import load_file

    weights = {}
    for path in weight_files(component, stem):
        check_safetensors_file(path)
        weights.update(load_file(str(path)))
    return weights


def read_transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    """transformer/'s tensors (official diffusers keys), checked strictly against the keys its config.json gives
    the Kontext DiT: any missing or unexpected key is an error naming it."""
    component = folder / "transformer"
    config = read_json(component / "config.json")
    weights = read_weights(component)
    with torch.device("meta"):  # only the key names are needed: nothing is allocated
        expected = set(KontextSD3Transformer.from_config(config).state_dict())
    check_keys(component, expected, set(weights))
    return weights


def check_keys(component: Path, expected: set[str], present: set[str], layout: str | None = None) -> None:
    """Refuse a component whose weight names are not those its layout (its config.json's model) has, naming up to
    ten each way."""
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        layout = layout or f"{component.name}/config.json"
        raise CheckpointError(f"{component}: weights do not match {layout} -- missing: "
                              f"{', '.join(missing[:10]) or 'none'}; unexpected: {', '.join(unexpected[:10]) or 'none'}"
                              ". Is it an unmodified checkpoint?")


def load_scheduler_config(folder: Path) -> dict:
    return read_json(folder / "scheduler" / "scheduler_config.json")


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
    """Load every component of a Kontext folder on the CPU in `dtype` (the diffusers modules)."""
    folder = Path(folder)
    check_folder(folder, KONTEXT_FILES, KONTEXT_LAYOUT, KONTEXT_REPOS[0])
    log.info("UniPic2: loading Kontext checkpoint %s (%s)", folder, dtype)
    transformer = load_pretrained(KontextSD3Transformer, folder / "transformer", dtype)
    return KontextComponents(
        transformer=transformer,
        vae=load_pretrained(AutoencoderKL, folder / "vae", dtype),
        text_encoders=load_text_encoders(folder, dtype, transformer.config.joint_attention_dim),
        scheduler_config=load_scheduler_config(folder),
    )


def load_kontext_text_encoders(folder: str | Path, dtype: torch.dtype = torch.float32) -> SD3TextEncoders:
    """Only the text encoders of a Kontext folder (the DiT and VAE load elsewhere, e.g. natively in ComfyUI)."""
    folder = Path(folder)
    check_folder(folder, KONTEXT_FILES, KONTEXT_LAYOUT, KONTEXT_REPOS[0])
    log.info("UniPic2: loading Kontext checkpoint %s (text encoders, %s)", folder, dtype)
    joint_dim = read_json(folder / "transformer" / "config.json")["joint_attention_dim"]
    return load_text_encoders(folder, dtype, joint_dim)


def download_repo(repo_id: str, destination: Path, tqdm_class=None, allow_patterns: tuple[str, ...] | None = None
                  ) -> Path:
    """Download a hub repo (only the files matching `allow_patterns`, when given) into `destination`; a clear
    error when offline.

    Progress goes to the console through tqdm; tqdm_class (a tqdm subclass) can mirror it elsewhere, e.g. to
    ComfyUI's progress bar.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("UniPic2: downloading %s into %s", repo_id, destination)
    only = {} if allow_patterns is None else {"allow_patterns": list(allow_patterns)}
    try:
        snapshot_download(repo_id, local_dir=str(destination), tqdm_class=tqdm_class, **only)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"could not download {repo_id} ({type(err).__name__}: {err}). Without internet access, download it "
            f"elsewhere (huggingface-cli download {repo_id}) and copy the folder to {destination}") from err
    return destination


def download_file(url: str, destination: Path, tqdm_class=None) -> Path:
    """Download one file from `url` to `destination` (published only once complete), with progress; a clear error
    when offline."""
    import urllib.request

    from tqdm.auto import tqdm

    log.info("UniPic2: downloading %s into %s", url, destination)
    partial = destination.with_name(destination.name + ".part")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (tqdm_class or tqdm)(total=total, unit="B", unit_scale=True, desc=destination.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(partial, destination)
    except OSError as err:  # urllib's URLError and HTTPError are OSErrors
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url} ({type(err).__name__}: {err}). Without internet access, "
                              f"download it elsewhere and copy it to {destination}") from err
    return destination


@dataclass
class MetaQueryComponents:
    transformer: KontextSD3Transformer
    vae: AutoencoderKL
    mllm: MetaQueryMLLM
    scheduler_config: dict


def check_qwen_folder(folder: Path) -> None:
    if not is_qwen25vl_folder(folder):
        raise CheckpointError(f"{folder} is not a Qwen2.5-VL folder (config.json with model_type 'qwen2_5_vl'); "
                              f"download {QWEN_REPO}")
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()
    if not (folder / "preprocessor_config.json").exists() or not has_tokenizer:
        raise CheckpointError(f"{folder} has no processor/tokenizer files (preprocessor_config.json, tokenizer.json "
                              f"or vocab.json + merges.txt); copy them from {QWEN_REPO}")


def load_qwen25vl(qwen: Path, dtype: torch.dtype, tokenizer_folder: Path | None):
    """Qwen2.5-VL and its processor from a folder, or from a single file (then with a Qwen2.5 tokenizer folder)."""
    if qwen.is_file():
        from .qwen25vl import load_qwen25vl_file  # it builds on this module's checks

        if tokenizer_folder is None:
            raise CheckpointError(f"{qwen} is a single file: give the Qwen2.5 tokenizer folder to read it with")
        return load_qwen25vl_file(qwen, tokenizer_folder, dtype)
    check_qwen_folder(qwen)
    return load_pretrained(Qwen2_5_VLForConditionalGeneration, qwen, dtype), AutoProcessor.from_pretrained(str(qwen))


def load_metaquery_mllm(qwen: Path, conditioner_folder: Path, dtype: torch.dtype,
                        tokenizer_folder: Path | None = None) -> MetaQueryMLLM:
    """Qwen2.5-VL (a folder or a single file), its processor and the conditioner, checked to fit each other."""
    conditioner = load_pretrained(MetaQueryConditioner, conditioner_folder, dtype)
    mllm, processor = load_qwen25vl(qwen, dtype, tokenizer_folder)
    mllm_width, expected = mllm.config.text_config.hidden_size, conditioner.config.llm_hidden_size
    if mllm_width != expected:
        raise CheckpointError(f"the MLLM in {qwen} has hidden size {mllm_width} but the conditioner in "
                              f"{conditioner_folder} expects {expected} (llm_hidden_size); use {QWEN_REPO}")
    return MetaQueryMLLM(mllm, processor, conditioner)


def load_metaquery(folder: str | Path, qwen_folder: str | Path | None = None,
                   dtype: torch.dtype = torch.float32) -> MetaQueryComponents:
    """Load a MetaQuery folder on the CPU; the MLLM from `qwen_folder`, or from inside the folder when None."""
    folder = Path(folder)
    mllm = load_metaquery_encoder(folder, qwen_folder, dtype)
    return MetaQueryComponents(load_pretrained(KontextSD3Transformer, folder / "transformer", dtype),
                               load_pretrained(AutoencoderKL, folder / "vae", dtype), mllm,
                               load_scheduler_config(folder))


def load_metaquery_encoder(folder: str | Path, qwen_folder: str | Path | None = None,
                           dtype: torch.dtype = torch.float32, tokenizer_folder: Path | None = None) -> MetaQueryMLLM:
    """The MLLM and conditioner of a MetaQuery folder, checked against its DiT's config (the DiT itself is not
    loaded); the MLLM from `qwen_folder` (a folder, or a single file read with `tokenizer_folder`), or from inside
    the folder when None."""
    folder = Path(folder)
    check_folder(folder, METAQUERY_FILES, METAQUERY_LAYOUT, METAQUERY_REPOS[0])
    qwen_folder = Path(qwen_folder) if qwen_folder else find_qwen_inside(folder)
    if qwen_folder is None:
        raise CheckpointError(f"{folder} holds no Qwen2.5-VL folder; choose one ({QWEN_REPO}) in the loader")
    log.info("UniPic2: loading MetaQuery checkpoint %s with MLLM %s (%s)", folder, qwen_folder, dtype)
    mllm = load_metaquery_mllm(qwen_folder, folder / "conditioner", dtype, tokenizer_folder)
    dit = read_json(folder / "transformer" / "config.json")
    made = mllm.conditioner.config
    wanted = (dit.get("joint_attention_dim"), dit.get("pooled_projection_dim"))
    if (made.joint_attention_dim, made.pooled_projection_dim) != wanted:
        raise CheckpointError(f"{folder}: the conditioner makes {made.joint_attention_dim}/{made.pooled_projection_dim}"
                              f"-wide conditioning, the DiT takes {wanted[0]}/{wanted[1]}")
    return mllm
