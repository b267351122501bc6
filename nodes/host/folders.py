"""ComfyUI's folders as the pack uses them: model folders (models/unipic2 registered here) and the choices a
loader lists from them, official repos downloaded into models/unipic2, the input folder the user's paths are
relative to, and LoRA files."""

import os
from pathlib import Path

import folder_paths

from .progress import download_progress

UNIPIC2_FOLDER = "unipic2"
folder_paths.add_model_folder_path(UNIPIC2_FOLDER, os.path.join(folder_paths.models_dir, UNIPIC2_FOLDER))


def model_folders(kind: str) -> list[str]:
    """The registered folders of a model kind ("unipic2", "diffusers"); none when the host lacks the kind."""
    try:
        return folder_paths.get_folder_paths(kind)
    except KeyError:
        return []


def unipic2_download_folder() -> str:
    return model_folders(UNIPIC2_FOLDER)[0]


def input_folder() -> Path:
    return Path(folder_paths.get_input_directory()).resolve()


def input_path(text: str, node: str, name: str) -> Path:
    """A file or folder the user named, relative to ComfyUI's input folder, with links resolved; anything that
    ends up outside that folder is refused (a shared server must not read files its users may not)."""
    root = input_folder()
    path = (root / text.strip()).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{node}: '{name}' is '{text.strip()}', which is outside ComfyUI's input folder; put it in "
                         f"{root} (a subfolder is fine) and give its path relative to that folder")
    return path


def lora_folder() -> str:
    """Where the trainer writes LoRAs: models/loras/unipic2 (listed by every LoRA loader)."""
    return os.path.join(folder_paths.get_folder_paths("loras")[0], UNIPIC2_FOLDER)


def text_encoder_files() -> dict[str, Path]:
    """The .safetensors files in models/text_encoders (and the folders registered for it), by their listed name."""
    return {name: Path(folder_paths.get_full_path("text_encoders", name))
            for name in folder_paths.get_filename_list("text_encoders") if name.endswith(".safetensors")}


def qwen25_tokenizer_folder() -> Path:
    """The Qwen2.5 tokenizer ComfyUI ships for its Qwen-Image text encoder (vocab.json, merges.txt)."""
    import comfy.sd

    return Path(comfy.sd.__file__).parent / "text_encoders" / "qwen25_tokenizer"


def lora_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list("loras") if name.endswith(".safetensors")]


def lora_path(name: str) -> str:
    return folder_paths.get_full_path("loras", name)


def local_folders(kinds: tuple[str, ...], accept) -> dict[str, Path]:
    """Choice name -> folder for each subfolder of the registered model folders that `accept(path, kind)` takes;
    folders outside models/unipic2 are named '<kind>/<name>'."""
    found = {}
    for kind in kinds:
        for root in map(Path, model_folders(kind)):
            if root.is_dir():
                for path in sorted(root.iterdir()):
                    if accept(path, kind):
                        found.setdefault(path.name if kind == UNIPIC2_FOLDER else f"{kind}/{path.name}", path)
    return found


def resolve(choice: str, local: dict[str, Path], repos: tuple[str, ...], what: str, fetch=None) -> Path:
    """A local choice, or an official repo id: its models/unipic2/<name> copy, downloaded when absent (by
    fetch(choice, destination) -> path; default: the whole hub repo)."""
    if choice in local:
        return local[choice]
    if choice in repos:
        from ...unipic_core.models.repos import published_name

        name = published_name(choice)
        if name in local:
            return local[name]
        if fetch is None:
            from ...unipic_core.models.loading import download_repo

            fetch = lambda repo, destination: download_repo(repo, destination, download_progress())
        return fetch(choice, Path(unipic2_download_folder()) / name)
    raise ValueError(f"UniPic2 Load: {what} '{choice}' not found; put it in "
                     f"{unipic2_download_folder()} or pick one of {', '.join(repos)}")
