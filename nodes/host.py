"""The one place that touches the ComfyUI host: model folders, memory manager, progress bar and Cancel.

Written against ComfyUI 0.3.75, the minimum version the pack supports (DESIGN.md section 6).
"""

import contextlib
import logging
import os
import sys

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher

log = logging.getLogger("unipic2")

UNIPIC2_FOLDER = "unipic2"
folder_paths.add_model_folder_path(UNIPIC2_FOLDER, os.path.join(folder_paths.models_dir, UNIPIC2_FOLDER))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_folders(kind: str) -> list[str]:
    """The registered folders of a model kind ("unipic2", "diffusers"); none when the host lacks the kind."""
    try:
        return folder_paths.get_folder_paths(kind)
    except KeyError:
        return []


def unipic2_download_folder() -> str:
    return model_folders(UNIPIC2_FOLDER)[0]


def pick_dtype(choice: str) -> torch.dtype:
    """'auto' is bf16 where the device supports it, fp16 on other GPUs, fp32 on the CPU."""
    if choice != "auto":
        return DTYPES[choice]
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


class Component(torch.nn.Module):
    """What a ModelPatcher manages: one diffusers/transformers model under `.module`.

    New hosts assign `.device` (and bookkeeping attributes) on the object they manage; diffusers and transformers
    models expose `device` as a read-only property, so they cannot be handed to ModelPatcher directly.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def wrap(module: torch.nn.Module) -> ModelPatcher:
    """A ModelPatcher around one component; its size (for ComfyUI's planning) is the module's true size."""
    return ModelPatcher(Component(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def device() -> torch.device:
    return mm.get_torch_device()


def load_on_device(*patchers: ModelPatcher) -> list[torch.nn.Module]:
    """Let ComfyUI place these components on the compute device (evicting others as it sees fit)."""
    mm.load_models_gpu(list(patchers))
    return [p.model.module for p in patchers]


def lora_folder() -> str:
    """Where the trainer writes LoRAs: models/loras/unipic2 (listed by every LoRA loader)."""
    return os.path.join(folder_paths.get_folder_paths("loras")[0], UNIPIC2_FOLDER)


def lora_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list("loras") if name.endswith(".safetensors")]


def lora_path(name: str) -> str:
    return folder_paths.get_full_path("loras", name)


def patch_lora(patcher: ModelPatcher, tensors: dict[str, torch.Tensor], key_map: dict[str, str],
               strength: float) -> tuple[ModelPatcher, set[str]]:
    """A clone of `patcher` with LoRA weight patches built by the host's own comfy.lora.load_lora.

    tensors use the kohya names every host reads ('<name>.lora_up.weight' / '.lora_down.weight');
    key_map maps '<name>' to the patcher's weight key. Returns the clone and the keys it patches.
    """
    import comfy.lora

    patches = comfy.lora.load_lora(tensors, key_map)
    clone = patcher.clone()
    return clone, set(clone.add_patches(patches, strength))


@contextlib.contextmanager
def training_mode():
    """ComfyUI runs nodes under inference_mode; training needs autograd back."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def make_trainable(module: torch.nn.Module) -> None:
    """Replace inference tensors (made when the loader ran under inference_mode) by normal copies: autograd can
    neither save nor version-count them. A no-op once done."""
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()


_LAST_MESSAGES: dict[str, dict] = {}  # (event/node) -> the latest message, for browsers that reconnect


def _server():
    """The running PromptServer, if any. Only looked up: importing ComfyUI's server module where no server runs
    (in-process use) can fail on new hosts."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def send_to_client(event: str, node_id: str, data: dict) -> None:
    """A pack message over ComfyUI's websocket to the client that queued the running prompt (web/ listens); the
    latest one per node is also kept for `GET /unipic2/messages/<event>`, so a reloaded page catches up at once.
    Without a server (the in-process tests, a script) there is no one to tell."""
    message = {"node": node_id, **data}
    _LAST_MESSAGES[f"{event}/{node_id}"] = message
    server = _server()
    if server is not None and server.client_id is not None:
        server.send_sync(event, message, server.client_id)


def register_routes() -> None:
    server = _server()
    if server is None:
        return
    from aiohttp import web

    @server.routes.get("/unipic2/messages/{event}")
    async def latest_messages(request):
        prefix = request.match_info["event"] + "/"
        return web.json_response([m for key, m in _LAST_MESSAGES.items() if key.startswith(prefix)])


def jpeg_data_url(image: torch.Tensor, height: int = 96) -> str:
    """IMAGE [H, W, 3] 0..1 -> a small 'data:image/jpeg;base64,...' for the browser."""
    import base64
    import io

    from ..unipic_core.images import to_pil

    picture = to_pil(image)
    picture = picture.resize((max(1, round(picture.width * height / picture.height)), height))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def cancel_requested() -> bool:
    return mm.processing_interrupted()


def download_progress():
    """A tqdm class for hub downloads: the console bar as usual, mirrored on ComfyUI's progress bar."""
    from tqdm.auto import tqdm

    class ComfyProgress(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            total = max(int(self.total or 0), int(self.n), 1)
            if not hasattr(self, "comfy_bar"):
                self.comfy_bar = comfy.utils.ProgressBar(total)
            self.comfy_bar.update_absolute(int(self.n), total)
            return shown

    return ComfyProgress


def check_cancel() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


class StepProgress:
    """ComfyUI progress bar with an optional RGB preview [h, w, 3] per step."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, done: int, total: int, preview_rgb: torch.Tensor | None = None) -> None:
        preview = None
        if preview_rgb is not None:
            from ..unipic_core.images import to_pil

            preview = ("JPEG", to_pil(preview_rgb), 512)
        self.bar.update_absolute(done, total, preview)
