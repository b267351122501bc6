"""LoRA files: round trip, diffusers' load_lora_weights at the intended scale, and clear errors."""

import errno
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import safe_open, save_file

from conftest import load_lora_in_diffusers, randomise_lora_b
import unipic_core.models.lora as lora_module
from unipic_core.atomic_files import NameTaken, WriteError, atomic_write
from unipic_core.models.lora import (TARGET_MODULES, LoRAError, LoRAWeights, add_lora, adapter_tensors,
                                     load_into_adapter, load_lora, lora_weights, save_lora, set_adapter_tensors)


def _forward(transformer):
    config = transformer.config
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                           encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=g),
                           pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                           timestep=torch.tensor([300.0, 700.0])).sample


def test_adapter_targets_both_attention_streams(fresh_dit):
    add_lora(fresh_dit, 4, 8, seed=0)
    names = {k.split("transformer_blocks.0.attn.")[1].rsplit(".lora_", 1)[0]
             for k in adapter_tensors(fresh_dit) if "transformer_blocks.0.attn." in k}
    assert names == set(TARGET_MODULES)
    assert all(p.dtype == torch.float32 and p.requires_grad
               for n, p in fresh_dit.transformer.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in fresh_dit.transformer.named_parameters() if "lora_" not in n)


def test_file_loads_in_diffusers_at_the_trained_scale(fresh_dit, tiny_kontext, tmp_path):
    add_lora(fresh_dit, 4, alpha=12, seed=0)  # scale alpha / r = 3
    randomise_lora_b(fresh_dit, 0.2)
    expected = _forward(fresh_dit.transformer)
    path = save_lora(lora_weights(adapter_tensors(fresh_dit), 4, 12, {"base_model": "tiny"}), tmp_path / "l.safetensors")
    fresh_dit.remove_lora()
    base = _forward(fresh_dit.transformer)
    assert not torch.allclose(base, expected, atol=1e-3)

    load_lora_in_diffusers(fresh_dit.transformer, tiny_kontext, path)
    assert torch.allclose(_forward(fresh_dit.transformer), expected, atol=1e-5)


def test_file_round_trip_keeps_tensors_and_metadata(fresh_dit, tmp_path):
    add_lora(fresh_dit, 4, alpha=8, seed=0)
    randomise_lora_b(fresh_dit, 0.2)
    lora = lora_weights(adapter_tensors(fresh_dit), 4, 8, {"base_model": "tiny", "steps": 7, "rewards": ["brightness"]})
    path = save_lora(lora, tmp_path / "sub" / "l.safetensors")
    loaded = load_lora(path)
    assert loaded.tensors.keys() == lora.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], lora.tensors[k]) for k in lora.tensors)
    assert (loaded.rank, loaded.alpha, loaded.info["steps"], loaded.info["rewards"]) == (4, 8, 7, ["brightness"])
    assert all(k.startswith("transformer.") and ".lora_" in k for k in loaded.tensors)
    with safe_open(str(path), "pt") as f:
        peft_meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert peft_meta["transformer.r"] == 4 and peft_meta["transformer.lora_alpha"] == 4  # scale folded into B
    # Reading it back into a live adapter with another alpha keeps the same delta W.
    raw = adapter_tensors(fresh_dit)
    fresh_dit.remove_lora()
    add_lora(fresh_dit, 4, alpha=8, seed=1)
    load_into_adapter(fresh_dit, loaded, 4, 8)
    assert all(torch.allclose(adapter_tensors(fresh_dit)[k], raw[k]) for k in raw)
    # A foreign peft file (diffusers' metadata only, lora_alpha = 2 r) reads at its scale: B doubled.
    _rewrite(path, metadata={"unipic2": "{}", "lora_adapter_metadata": json.dumps({"transformer.r": 4,
                                                                                  "transformer.lora_alpha": 8})})
    foreign = load_lora(path)
    assert (foreign.rank, foreign.alpha) == (4, 4)
    assert all(torch.allclose(foreign.tensors[k], lora.tensors[k] * (2 if "lora_B" in k else 1)) for k in lora.tensors)


def test_remove_lora_restores_the_original_weight_keys(fresh_dit):
    keys = set(fresh_dit.transformer.state_dict())
    add_lora(fresh_dit, 4, 8, seed=0)
    assert set(fresh_dit.transformer.state_dict()) != keys
    fresh_dit.remove_lora()
    assert set(fresh_dit.transformer.state_dict()) == keys


def test_bad_lora_files_are_refused_clearly(fresh_dit, tmp_path):
    add_lora(fresh_dit, 4, 8, seed=0)
    lora = lora_weights(adapter_tensors(fresh_dit), 4, 8, {})
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(LoRAError, match="cannot read LoRA file"):
        load_lora(tmp_path / "broken.safetensors")
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoRAError, match="no 'transformer.*lora_A"):
        load_lora(tmp_path / "other.safetensors")
    fresh_dit.remove_lora()
    add_lora(fresh_dit, 8, 8, seed=0)
    with pytest.raises(LoRAError, match="rank 4 but training asks for rank 8"):
        load_into_adapter(fresh_dit, lora, 8, 8)


def test_unwritable_folder_keeps_the_previous_file(fresh_dit, tmp_path, monkeypatch):
    add_lora(fresh_dit, 4, 8, seed=0)
    lora = lora_weights(adapter_tensors(fresh_dit), 4, 8, {"steps": 1})
    path = save_lora(lora, tmp_path / "l.safetensors")
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unipic_core.models.lora.save_file", disk_full)
    with pytest.raises(WriteError, match="No space left.*previous file there is unchanged"):
        save_lora(lora_weights(adapter_tensors(fresh_dit), 4, 8, {"steps": 2}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]  # no temp file left behind


# --- atomic writes under faults ------------------------------------------------------------------------------


def _small_lora(rank: int = 2, info: dict | None = None) -> LoRAWeights:
    """Two modules, no model needed: enough for file tests."""
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
        tensors[f"transformer.{module}.lora_A.weight"] = torch.full((rank, 6), 0.5)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.full((6, rank), 0.25)
    return LoRAWeights(tensors, {"rank": rank, "alpha": rank, **(info or {})})


def _no_hard_links(src, dst):
    raise PermissionError(errno.EPERM, "Operation not permitted")


def _write_bytes(data: bytes):
    return lambda tmp: tmp.write_bytes(data)


def _fail_after_writing_part(error: BaseException):
    def write(tmp):
        tmp.write_bytes(b"half a fi")
        raise error
    return write


def test_atomic_write_turns_any_write_error_into_a_clear_message(tmp_path):
    path = tmp_path / "run.training-state"
    atomic_write(path, _write_bytes(b"step 1"), "the training checkpoint")
    # What torch.save raises on a full disk: a RuntimeError, not an OSError.
    full_disk = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file")
    with pytest.raises(WriteError, match=r"could not write the training checkpoint to .*run.training-state "
                                        r"\(RuntimeError: .*PytorchStreamWriter.*free disk space.*unchanged"):
        atomic_write(path, _fail_after_writing_part(full_disk), "the training checkpoint")
    assert path.read_bytes() == b"step 1"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # Ctrl+C is not turned into a message, but its temp file goes too.
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, _fail_after_writing_part(KeyboardInterrupt()), "the training checkpoint")
    assert path.read_bytes() == b"step 1"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_keeps_the_message_when_cleanup_fails(tmp_path, monkeypatch, caplog):
    def cannot_unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", cannot_unlink)
    with pytest.raises(WriteError, match="could not write the LoRA .*No space left on device.*free disk space"):
        atomic_write(tmp_path / "l.safetensors", _fail_after_writing_part(OSError(28, "No space left on device")),
                     "the LoRA")
    assert "could not remove" in caplog.text and ".l.safetensors.tmp-" in caplog.text


def test_atomic_write_fsyncs_before_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recording_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    atomic_write(tmp_path / "l.safetensors", _write_bytes(b"data"), "the LoRA")
    assert events == ["fsync file", "rename", "fsync folder"]

    def no_folder_fsync(fd):  # as some file systems answer
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    atomic_write(tmp_path / "l.safetensors", _write_bytes(b"new data"), "the LoRA")
    assert (tmp_path / "l.safetensors").read_bytes() == b"new data"


def test_stale_temp_files_of_dead_processes_are_removed_on_the_next_write(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(child.stdout), os.getppid()
    host = socket.gethostname()
    stale = tmp_path / f".l.safetensors.tmp-{host}-{dead}"
    writing = tmp_path / f".l.safetensors.tmp-{host}-{alive}"  # another process still writing this name
    other = tmp_path / f".m.safetensors.tmp-{host}-{dead}"  # another file's: left for its own next write
    elsewhere = tmp_path / f".l.safetensors.tmp-another-machine-{dead}"  # its pid means nothing here
    for temp in (stale, writing, other, elsewhere):
        temp.write_bytes(b"half a fi")
    atomic_write(tmp_path / "l.safetensors", _write_bytes(b"data"), "the LoRA")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["l.safetensors", writing.name, other.name,
                                                                  elsewhere.name])


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_lora_files_get_the_users_umask_permissions(tmp_path, umask):
    lora = _small_lora()
    previous = os.umask(umask)
    try:
        saved = save_lora(lora, tmp_path / "l.safetensors")
        atomic_write(tmp_path / "state", lambda tmp: torch.save({"step": 1}, tmp), "the training checkpoint")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask  # safetensors alone writes 0600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard links", "no hard links (FAT)"])
def test_save_lora_without_replace_never_overwrites_a_file_created_meanwhile(tmp_path, monkeypatch, hard_links):
    lora = _small_lora()
    path = tmp_path / "l.safetensors"
    real_save_file = lora_module.save_file

    def save_while_another_writer_takes_the_name(tensors, tmp, metadata):
        real_save_file(tensors, tmp, metadata=metadata)
        path.write_bytes(b"theirs")

    monkeypatch.setattr(lora_module, "save_file", save_while_another_writer_takes_the_name)
    if not hard_links:
        monkeypatch.setattr(os, "link", _no_hard_links)
    with pytest.raises(NameTaken, match=r"the LoRA was not written: .*l.safetensors already exists; choose "
                                            "another name"):
        save_lora(lora, path, replace=False)
    assert path.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(lora_module, "save_file", real_save_file)
    loaded = load_lora(save_lora(lora, tmp_path / "free.safetensors", replace=False))
    assert all(torch.equal(loaded.tensors[k], lora.tensors[k]) for k in lora.tensors)


# --- LoRAs that do not fit ----------------------------------------------------------------------------------


def test_start_lora_covering_part_of_the_adapter_warns(fresh_dit, caplog):
    add_lora(fresh_dit, 4, 8, seed=0)
    randomise_lora_b(fresh_dit, 0.2)
    full = lora_weights(adapter_tensors(fresh_dit), 4, 8, {})
    kept = full.modules()[:5]
    part = LoRAWeights({k: v for k, v in full.tensors.items() if any(f".{m}.lora_" in k for m in kept)},
                       {"rank": 4, "alpha": 8})
    raw = adapter_tensors(fresh_dit)
    fresh_dit.remove_lora()
    add_lora(fresh_dit, 4, 8, seed=1)
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        load_into_adapter(fresh_dit, part, 4, 8)
    assert f"covers 5 of the adapter's {len(full.modules())} modules" in caplog.text
    started = adapter_tensors(fresh_dit)
    assert all(torch.allclose(started[k], raw[k]) for k in part.tensors)
    assert all(not started[k].any() for k in started if k.endswith("lora_B.weight") and k not in part.tensors)


def test_start_lora_from_another_base_model_warns(fresh_dit, caplog):
    add_lora(fresh_dit, 4, 8, seed=0)
    lora = lora_weights(adapter_tensors(fresh_dit), 4, 8, {"base_model": "UniPic2-SD3.5M-Kontext-2B"})
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        load_into_adapter(fresh_dit, lora, 4, 8, base_model="UniPic2-tiny-Kontext")
    assert "trained on 'UniPic2-SD3.5M-Kontext-2B', not on 'UniPic2-tiny-Kontext'" in caplog.text


def _wider(lora: LoRAWeights, extra_in: int) -> LoRAWeights:
    """The same modules with A [r, in + extra_in]: a LoRA of another model size."""
    return LoRAWeights({k: torch.cat([v, torch.ones(v.shape[0], extra_in)], 1) if k.endswith("lora_A.weight") else v
                        for k, v in lora.tensors.items()}, dict(lora.info))


def test_start_lora_with_other_shapes_is_refused(fresh_dit):
    add_lora(fresh_dit, 4, 8, seed=0)
    lora = lora_weights(adapter_tensors(fresh_dit), 4, 8, {})
    before = adapter_tensors(fresh_dit)
    first = lora.modules()[0]
    with pytest.raises(LoRAError, match=rf"transformer.{re.escape(first)}.lora_A.weight is \(4, \d+\) but the "
                                        rf"adapter's module {re.escape(first)} needs \(4, \d+\); the LoRA was made "
                                        "for another model size"):
        load_into_adapter(fresh_dit, _wider(lora, 8), 4, 8)
    foreign = LoRAWeights({**lora.tensors, "transformer.proj_out.lora_A.weight": torch.ones(4, 8),
                           "transformer.proj_out.lora_B.weight": torch.ones(8, 4)}, lora.info)
    with pytest.raises(LoRAError, match="transformer.proj_out.lora_A.weight, which is not in the training adapter"):
        load_into_adapter(fresh_dit, foreign, 4, 8)
    after = adapter_tensors(fresh_dit)
    assert all(torch.equal(after[k], before[k]) for k in before)  # checked before anything is copied


def test_resuming_an_adapter_with_modules_left_out_is_refused(fresh_dit):
    add_lora(fresh_dit, 4, 8, seed=0)
    raw = adapter_tensors(fresh_dit)
    partial = {k: v for k, v in raw.items() if ".transformer_blocks.0." not in k}
    left_out = len({k.rpartition(".lora_")[0] for k in raw.keys() - partial.keys()})
    with pytest.raises(LoRAError, match=rf"leave out {left_out} of its modules \(first: transformer_blocks.0.attn"):
        set_adapter_tensors(fresh_dit, partial)


def _rewrite(path, *, metadata=None, tensors=None):
    """The file at `path` again, with some metadata entries and tensors replaced (None: removed)."""
    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **(metadata or {})}
        values = {**{k: f.get_tensor(k) for k in f.keys()}, **(tensors or {})}
    save_file({k: v for k, v in values.items() if v is not None}, str(path), metadata=meta)


A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
B = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"


def _unipic2(**changes):
    return {"unipic2": json.dumps({"rank": 2, "alpha": 2, **changes})}


def _peft(**changes):
    return {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 2, **changes})}


@pytest.mark.parametrize("change, message", [
    pytest.param(dict(metadata={"unipic2": "{not json"}), "its 'unipic2' metadata is not valid JSON",
                 id="unipic2 not JSON"),
    pytest.param(dict(metadata={"lora_adapter_metadata": '{"transformer.r": 2'}),
                 "its 'lora_adapter_metadata' metadata is not valid JSON", id="peft not JSON"),
    pytest.param(dict(metadata={"unipic2": "[2, 2]"}), "its 'unipic2' metadata is a JSON list, not an object",
                 id="unipic2 a list"),
    pytest.param(dict(metadata=_unipic2(rank=0)), "metadata 'rank' is 0, not a positive whole number", id="rank 0"),
    pytest.param(dict(metadata=_unipic2(rank=-2)), "metadata 'rank' is -2, not a positive whole", id="rank -2"),
    pytest.param(dict(metadata=_unipic2(rank="2")), "metadata 'rank' is '2', not a positive whole", id="rank text"),
    pytest.param(dict(metadata=_unipic2(rank=None)), "metadata 'rank' is None, not a positive whole", id="rank null"),
    pytest.param(dict(metadata=_unipic2(alpha="8")), "metadata 'alpha' is '8', not a positive number", id="alpha text"),
    pytest.param(dict(metadata=_unipic2(alpha=None)), "metadata 'alpha' is None, not a positive", id="alpha null"),
    pytest.param(dict(metadata=_peft(**{"transformer.r": "2"})), "metadata 'transformer.r' is '2', not a positive",
                 id="peft r text"),
    pytest.param(dict(metadata=_peft(**{"transformer.lora_alpha": None})),
                 "metadata 'transformer.lora_alpha' is None, not a positive number", id="peft alpha null"),
    pytest.param(dict(metadata=_unipic2(rank=8)), "metadata 'rank' is 8 but its tensors have rank 2",
                 id="rank disagrees"),
    pytest.param(dict(metadata=_peft(**{"transformer.r": 4})), "'transformer.r' is 4 but its tensors have rank 2",
                 id="peft r disagrees"),
    pytest.param(dict(tensors={B: None}), "module transformer_blocks.0.attn.to_q has lora_A but no lora_B",
                 id="A without B"),
    pytest.param(dict(tensors={A: None}), "module transformer_blocks.0.attn.to_q has lora_B but no lora_A",
                 id="B without A"),
    pytest.param(dict(tensors={B: torch.ones(6, 3)}),
                 r"lora_A \(2, 6\) and lora_B \(6, 3\), not \[r, in\] and \[out, r\] with one r", id="pair ranks"),
    pytest.param(dict(tensors={A: torch.full((2, 6), float("nan"))}), f"{A} holds NaN or infinite values", id="NaN"),
    pytest.param(dict(tensors={B: torch.full((6, 2), float("inf"))}), f"{B} holds NaN or infinite values", id="inf"),
])
def test_malformed_lora_metadata_is_named(tmp_path, change, message):
    path = save_lora(_small_lora(), tmp_path / "l.safetensors")
    _rewrite(path, **change)
    with pytest.raises(LoRAError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_lora(path)
