"""Shared fixtures: tiny checkpoints generated once per test session in the official folder layout."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: a ComfyUI host put on sys.path by a host test must win the name `nodes`.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory) -> Path:
    from unipic_core.tiny import write_kontext_folder

    return write_kontext_folder(tmp_path_factory.mktemp("ckpt") / "UniPic2-tiny-Kontext")


@pytest.fixture(scope="session")
def tiny_kontext(tiny_kontext_dir):
    from unipic_core.loading import load_kontext

    return load_kontext(tiny_kontext_dir, torch.float32)
