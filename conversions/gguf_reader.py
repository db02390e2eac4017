"""Read a GGUF file (llama.cpp) as Hugging Face-named float32 numpy arrays.

Every tensor is dequantized to float32 with `gguf.quants.dequantize`. For the
llama architecture llama.cpp's converter permutes the rows of q_proj/k_proj so
that the two rotary halves of each head are interleaved (GGML's "normal" rope
rotates adjacent pairs, HF's rotates halves); we undo that permutation so the
arrays match the HF checkpoint the GGUF was made from. Qwen2/Qwen3 GGUFs use
the "neox" rope and are stored unpermuted.

The HF config and tokenizer of a GGUF come from transformers
(`AutoConfig`/`AutoTokenizer.from_pretrained(dir, gguf_file=...)`); see
`jaxpaged.model_source`.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# GGUF architectures whose q/k rows llama.cpp permuted on conversion.
_PERMUTED_QK_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Precomputed tables llama.cpp stores but HF recomputes from the config.
_IGNORED = ("rope_freqs.weight",)

_SCALAR_FORMATS = {  # struct formats (little-endian) of the scalar metadata value types
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_SCALAR_SIZES = {value_type: struct.calcsize(fmt) for value_type, fmt in _SCALAR_FORMATS.items()}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class _Dims:
    """Sizes from the GGUF metadata, used to un-permute and to check shapes."""

    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int


def _open_file(path: Path) -> BinaryIO:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return open(path, "rb")


def _read_counts(f: BinaryIO, path: Path) -> tuple[int, int, int]:
    """(version, tensor count, metadata count) from the start of a GGUF file; a version above
    0xFFFF means the file is big-endian."""
    header = f.read(24)
    if len(header) < 24 or header[:4] != b"GGUF":
        raise ValueError(f"{path.name} is not a GGUF file")
    _magic, version, num_tensors, num_kv = struct.unpack("<4sIQQ", header)
    return version, num_tensors, num_kv


def _read_str(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    return f.read(length).decode("utf-8")


def _skip_value(f: BinaryIO, value_type: int) -> None:
    if value_type == GGUFValueType.STRING:
        (length,) = struct.unpack("<Q", f.read(8))
        f.seek(length, 1)
    elif value_type == GGUFValueType.ARRAY:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if item_type in _SCALAR_SIZES:
            f.seek(count * _SCALAR_SIZES[item_type], 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        f.seek(_SCALAR_SIZES[value_type], 1)


def read_gguf(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF tensor name, float32 array) for every tensor of a GGUF file.

    Tied embeddings stay tied: a GGUF without `output.weight` yields no `lm_head.weight`.
    """
    metadata, tensors = _read_tensor_table(Path(path))
    arch = metadata.get("general.architecture")
    if arch is None:
        raise ValueError(f"{Path(path).name}: GGUF file has no general.architecture metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{Path(path).name}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral GGUFs use the llama architecture)"
        )
    dims = _dims(metadata, arch)
    for name, qtype, gguf_shape, data in tensors:
        if name in _IGNORED:
            continue
        hf_name = hf_tensor_name(name)
        try:
            array = np.array(dequantize(data, qtype), dtype=np.float32)
        except NotImplementedError as error:
            raise ValueError(
                f"GGUF tensor {name} uses quantization {qtype.name}, which the "
                f"gguf package cannot dequantize ({error}); convert the model with another type"
            ) from None
        if array.shape != gguf_shape:
            raise ValueError(
                f"GGUF tensor {name} ({hf_name}) dequantized to shape {array.shape}, "
                f"but the file declares {gguf_shape}"
            )
        _check_shape(name, hf_name, array.shape, _expected_shape(hf_name, dims))
        if arch in _PERMUTED_QK_ARCHITECTURES and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = dims.num_heads if "q_proj" in hf_name else dims.num_kv_heads
            array = unpermute_qk_rows(array, heads)
        yield hf_name, array


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (`blk.3.attn_q.weight`) to its HF name."""
    if m := _LAYER_RE.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (m := _GLOBAL_RE.fullmatch(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known Hugging Face name")


def unpermute_qk_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation.

    Per head, llama.cpp stores row 2*i + j from HF row j * head_dim/2 + i (j in {0, 1}),
    i.e. it interleaves the two rotary halves. Viewing each head as (head_dim/2, 2) and
    swapping those two axes puts the halves back one after the other.
    """
    rows, *rest = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _read_tensor_table(path: Path) -> tuple[dict, list]:
    """(scalar metadata, [(name, type, numpy shape, raw data)]) of a GGUF file, the raw data
    (bytes, or typed values for F32/F16) as `gguf.quants.dequantize` takes it.

    A little-endian file's header is read directly: `GGUFReader` turns every field, the ~100k
    vocabulary and merge strings included, into numpy views, and took 5.3 s of the 8.7 s that
    loading SmolLM2's GGUF took on a CI core. Big-endian files go through `GGUFReader`.
    """
    with _open_file(path) as f:
        version, num_tensors, num_kv = _read_counts(f, path)
        if version > 0xFFFF:  # big-endian
            reader = GGUFReader(path)
            metadata = {name: field.contents() for name, field in reader.fields.items()}
            return metadata, [(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())),
                               t.data) for t in reader.tensors]
        if version not in (2, 3):
            raise ValueError(f"{path.name}: GGUF version {version} is not supported (2 and 3 are)")
        metadata = {}
        for _ in range(num_kv):
            key = _read_str(f)
            (value_type,) = struct.unpack("<I", f.read(4))
            if value_type == GGUFValueType.STRING:
                metadata[key] = _read_str(f)
            elif value_type in _SCALAR_FORMATS:
                (metadata[key],) = struct.unpack(_SCALAR_FORMATS[value_type], f.read(_SCALAR_SIZES[value_type]))
            else:
                _skip_value(f, value_type)
        table = []
        for _ in range(num_tensors):
            name = _read_str(f)
            (num_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{num_dims}Q", f.read(8 * num_dims))  # innermost first
            qtype, offset = struct.unpack("<IQ", f.read(12))
            table.append((name, GGMLQuantizationType(qtype), tuple(reversed(dims)), offset))
        alignment = metadata.get("general.alignment", 32)
        data_start = -(-f.tell() // alignment) * alignment
    data = np.memmap(path, np.uint8, mode="r")
    tensors = []
    for name, qtype, shape, offset in table:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        start = data_start + offset
        raw = data[start:start + math.prod(shape) // block_size * type_size].view(np.ndarray)
        if len(raw) * block_size != math.prod(shape) * type_size:
            raise ValueError(f"{path.name}: GGUF tensor {name} runs past the end of the file")
        tensors.append((name, qtype, shape, raw.reshape(quant_shape_to_byte_shape(shape, qtype))))
    return metadata, tensors


def _dims(metadata: dict, arch: str) -> _Dims:
    def get(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise ValueError(f"GGUF file lacks metadata {arch}.{key}")
            return default
        return int(value)

    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // num_heads)
    return _Dims(
        hidden=hidden,
        ffn=get("feed_forward_length"),
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        v_head_dim=get("attention.value_length", head_dim),
    )


def _expected_shape(hf_name: str, d: _Dims) -> tuple[int | None, ...]:
    """HF shape (out, in) implied by the metadata; None where the metadata says nothing."""
    q, kv, vo = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.num_kv_heads * d.v_head_dim
    part = hf_name.rsplit(".", 2)[-2]
    if hf_name.endswith(".bias"):
        return {"q_proj": (q,), "k_proj": (kv,), "v_proj": (vo,)}.get(part, (None,))
    return {
        "embed_tokens": (None, d.hidden),
        "lm_head": (None, d.hidden),
        "norm": (d.hidden,),
        "input_layernorm": (d.hidden,),
        "post_attention_layernorm": (d.hidden,),
        "q_norm": (d.head_dim,),
        "k_norm": (d.head_dim,),
        "q_proj": (q, d.hidden),
        "k_proj": (kv, d.hidden),
        "v_proj": (vo, d.hidden),
        "o_proj": (d.hidden, d.num_heads * d.v_head_dim),
        "gate_proj": (d.ffn, d.hidden),
        "up_proj": (d.ffn, d.hidden),
        "down_proj": (d.hidden, d.ffn),
    }[part]


def _check_shape(gguf_name: str, hf_name: str, shape: tuple[int, ...], expected: tuple[int | None, ...]) -> None:
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = tuple("?" if e is None else e for e in expected)
        raise ValueError(
            f"GGUF tensor {gguf_name} ({hf_name}) has shape {shape}, but the file's metadata implies {want}"
        )
