"""Read a Hugging Face safetensors checkpoint directory as numpy arrays.

Handles a single `model.safetensors` or a sharded set described by
`model.safetensors.index.json`. numpy has no bfloat16, so safetensors' numpy
backend refuses BF16 tensors; those are read as raw bytes and viewed as
`ml_dtypes.bfloat16` (ml_dtypes ships with jaxlib, no JAX import needed).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtypes that safetensors' numpy backend cannot represent.
_RAW_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, each listed once."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / shard for shard in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def read_safetensors_dir(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF tensor name, array) for every tensor, reading each shard once."""
    for file in safetensors_files(path):
        yield from read_safetensors_file(file)


def read_safetensors_file(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    header, data_start = _read_header(file)
    with safe_open(file, framework="numpy") as f:
        for name in f.keys():
            dtype = header[name]["dtype"]
            if dtype in _RAW_DTYPES:
                yield name, _read_raw(file, data_start, header[name], _RAW_DTYPES[dtype])
            else:
                yield name, f.get_tensor(name)


def _read_header(file: Path) -> tuple[dict, int]:
    """The JSON header (name -> dtype/shape/data_offsets) and where the data begins."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _read_raw(file: Path, data_start: int, entry: dict, dtype: np.dtype) -> np.ndarray:
    begin, end = entry["data_offsets"]
    buf = bytearray(end - begin)
    with open(file, "rb") as f:
        f.seek(data_start + begin)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{file} is truncated")
    return np.frombuffer(buf, dtype=dtype).reshape(entry["shape"])
