"""The README's Python API example runs as written (on the tiny checkpoint)."""

import os
import re

from conftest import ROOT


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
