"""The README's Python examples run as written (on the tiny checkpoints), and its node reference is what the nodes
say of themselves (tools/node_reference.py)."""

import os
import re

from conftest import ROOT
from tools import node_reference


def test_readme_python_api_example_runs(tiny_kontext_dir, tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"ComfyUI/models/unipic2/UniPic2-SD3.5M-Kontext-2B"', repr(str(tiny_kontext_dir)))
    code = code.replace("flow_sigmas(50,", "flow_sigmas(3,")  # the tiny model needs no 50 steps to prove the path
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code.replace('save("edited.png")', f'save({str(tmp_path / "edited.png")!r})'), "README", "exec"), {})
    finally:
        os.chdir(cwd)
    from PIL import Image

    assert Image.open(tmp_path / "edited.png").size == (512, 352)


def test_readme_metaquery_example_runs(tiny_metaquery_dir, capsys):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- metaquery-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"ComfyUI/models/unipic2/UniPic2-Metaquery-9B"', repr(str(tiny_metaquery_dir)))
    code = code.replace('"ComfyUI/models/LLM/Qwen2.5-VL-7B-Instruct"', repr(str(tiny_metaquery_dir / "Qwen2.5-VL-tiny")))
    exec(compile(code, "README", "exec"), {})
    shapes, answer = capsys.readouterr().out.splitlines()[:2]
    assert shapes == "torch.Size([2, 256, 32]) torch.Size([2, 20])"
    assert answer.strip()


REGENERATE = ".venv/bin/python -m tools.node_reference"


def test_readme_node_reference_is_the_nodes_own(host):
    expected = node_reference.render(host.pack.NODE_CLASS_MAPPINGS, host.pack.NODE_DISPLAY_NAME_MAPPINGS)
    written = node_reference.readme_block((ROOT / "README.md").read_text())
    assert written == expected, f"README.md's node reference is out of date: run `{REGENERATE}` and commit README.md"


def write_model_folders(root):
    """One entry of every kind the pack's inputs list from model folders, as cheap as their listing allows (config
    files only; a Qwen2.5-VL file holds the two marker tensors). Returns a listing for model_folders_listing."""
    import json

    import torch
    from safetensors.torch import save_file

    from unipic_core.models.qwen25vl import MARKER_KEYS
    from unipic_core.models.repos import KONTEXT_TRANSFORMER_CLASS

    def config(path, values):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    config(root / "kontext" / "transformer" / "config.json", {"_class_name": KONTEXT_TRANSFORMER_CLASS})
    (root / "kontext" / "text_encoder").mkdir()
    config(root / "metaquery" / "transformer" / "config.json", {})
    config(root / "metaquery" / "conditioner" / "config.json", {})
    for name, model_type in (("qwen", "qwen2_5_vl"), ("clip", "clip"), ("owlv2", "owlv2")):
        config(root / name / "config.json", {"model_type": model_type})
    config(root / "processor" / "preprocessor_config.json", {"image_processor_type": "CLIPImageProcessor"})
    config(root / "adapter" / "adapter_config.json", {})
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (root / "mlp.pth").write_bytes(b"")
    save_file({key: torch.zeros(1) for key in MARKER_KEYS}, str(root / "qwen.safetensors"))
    files = {"loras": ["a.safetensors"], "text_encoders": ["qwen.safetensors"]}
    return (lambda kind: [str(root)]), (lambda kind: files.get(kind, [])), (lambda kind, name: str(root / name))


def test_node_reference_names_the_folders_of_exactly_the_inputs_that_list_files(host, tmp_path):
    mappings = host.pack.NODE_CLASS_MAPPINGS
    with node_reference.model_folders_listing(*write_model_folders(tmp_path)):
        listed = {node: cls.INPUT_TYPES() for node, cls in mappings.items()}
        rendered = node_reference.render(mappings, host.pack.NODE_DISPLAY_NAME_MAPPINGS)
    fixed = {node: node_reference.fixed_input_types(cls) for node, cls in mappings.items()}
    from_disk = {(node, name) for node in mappings for group in ("required", "optional")
                 for name, spec in listed[node].get(group, {}).items() if spec[0] != fixed[node][group][name][0]}
    assert from_disk == set(node_reference.DISK_CHOICES)
    for node, cls in mappings.items():  # each input's folders: what its node reads
        named = {kind for (n, _), (_, kinds) in node_reference.DISK_CHOICES.items() if n == node for kind in kinds}
        assert node_reference.folder_kinds_read(cls) == named, node
    # the files found on disk never reach the README
    assert rendered == node_reference.render(mappings, host.pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert "kontext" in listed["LoadUniPic2Kontext"]["required"]["checkpoint"][0]
    assert "kontext" not in fixed["LoadUniPic2Kontext"]["required"]["checkpoint"][0]
