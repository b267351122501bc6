"""Recognise UniPic2 and Qwen2.5-VL checkpoint folders by their files (cheap: reads config.json only)."""

import json
from pathlib import Path

from .repos import KONTEXT_TRANSFORMER_CLASS


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_kontext_folder(folder: Path, require_kontext_class: bool = False) -> bool:
    """transformer/ + text encoders; require_kontext_class also asks for the UniPic2 DiT (not plain SD3.5)."""
    config = _config(folder / "transformer" / "config.json")
    if not config or not (folder / "text_encoder").is_dir():
        return False
    return not require_kontext_class or config.get("_class_name") == KONTEXT_TRANSFORMER_CLASS


def is_metaquery_folder(folder: Path) -> bool:
    return (folder / "transformer" / "config.json").is_file() and (folder / "conditioner" / "config.json").is_file()


def is_qwen25vl_folder(folder: Path) -> bool:
    return _config(folder / "config.json").get("model_type") == "qwen2_5_vl"


def find_qwen_inside(folder: Path) -> Path | None:
    """A Qwen2.5-VL folder shipped inside a MetaQuery folder, if any."""
    if not folder.is_dir():
        return None
    return next((sub for sub in sorted(folder.iterdir()) if sub.is_dir() and is_qwen25vl_folder(sub)), None)


def is_clip_folder(folder: Path) -> bool:
    """A transformers CLIPModel folder (PickScore, OpenAI's CLIP), by its config.json."""
    return _config(folder / "config.json").get("model_type") == "clip"


def is_owlv2_folder(folder: Path) -> bool:
    """A transformers OWLv2 detector folder (the object reward's), by its config.json."""
    return _config(folder / "config.json").get("model_type") == "owlv2"


def is_clip_processor_folder(folder: Path) -> bool:
    """A folder with a CLIP image processor config (e.g. the processor files of laion's CLIP-H, which PickScore uses)."""
    config = _config(folder / "preprocessor_config.json")
    return "CLIP" in str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
