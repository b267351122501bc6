"""Random weights for a model built on the meta device, written as a published checkpoint's (sharded) safetensors
without ever holding the model: full-size checkpoints for benchmarks (a 7B in bf16 is ~15 GB) in seconds, in
about one shard's memory.

A benchmark's speed and memory do not depend on the values, so every tensor is a stretch of one pool of normal
values (std 0.02) from a random start: copying is far faster than drawing billions of numbers.
"""

import json
import math
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

SHARD_BYTES = 4 * 2**30  # the published checkpoints' shards hold ~4-5 GB each
POOL_SIZE = 1 << 24


def random_tensor(shape: torch.Size, pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A tensor of `shape` filled from `pool`, from a random start, cycling."""
    n = math.prod(shape)
    flat = torch.empty(n, dtype=pool.dtype)
    start, done = int(torch.randint(len(pool), (), generator=generator)), 0
    while done < n:
        piece = pool[start:start + n - done]
        flat[done:done + len(piece)] = piece
        done, start = done + len(piece), 0
    return flat.view(shape)


def write_random_weights(model: torch.nn.Module, folder: str | Path, stem: str, dtype: torch.dtype = torch.bfloat16,
                         rename=lambda key: key) -> None:
    """`model`'s state dict (its shapes: build it on the meta device) as random `dtype` tensors in `folder`:
    `stem`.safetensors, or over SHARD_BYTES the shards `stem`-00001-of-0000N.safetensors (cut by huggingface_hub,
    as save_pretrained cuts them) with the `stem`.safetensors.index.json that from_pretrained reads. `rename` maps
    a state-dict key to the file's (e.g. the published names where the library's module paths differ). The values
    follow torch's global seed, as the tiny writers' do."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    integers = [key for key, tensor in state.items() if not tensor.is_floating_point()]
    if integers:  # random floats would stand in for indices and still load
        raise ValueError(f"random weights are floats, but {integers[:3]} hold integers")
    meta = {rename(key): tensor.to(dtype) for key, tensor in state.items()}  # sizes only: no memory taken
    split = split_torch_state_dict_into_shards(meta, filename_pattern=stem + "{suffix}.safetensors",
                                               max_shard_size=SHARD_BYTES)
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    pool = torch.randn(POOL_SIZE, generator=generator).mul_(0.02).to(dtype)
    for name, keys in split.filename_to_tensors.items():
        save_file({key: random_tensor(meta[key].shape, pool, generator) for key in keys}, str(folder / name),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
