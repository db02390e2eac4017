"""`jaxpaged convert SRC DST`: an HF directory, Hub name or GGUF file → a jaxpaged checkpoint.

The checkpoint is a directory:
    params/                   orbax (OCDBT) checkpoint of the params pytree, in the canonical
                              (unpadded, [in, out]) layout, so it loads under any TP size
    jaxpaged_checkpoint.json  metadata: format, converter version, dtype, model config, chat
                              template, generation config, source files and their sha256
    config.json, generation_config.json, tokenizer files (copied, so transformers loads them)

Every tensor is checked against the param declarations (`models.params.param_specs`) while it
is read, so a wrong architecture, a missing tensor or a corrupted one fails before anything is
written. The work happens in a temporary directory beside DST, renamed into place at the end: an
interrupted conversion never leaves a half-written DST.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

CONVERTER_VERSION = "2"  # 2: q, k and v in one leaf (`models.params.join_qkv`); 1 held three
FORMAT = "jaxpaged-orbax"
METADATA_FILE = "jaxpaged_checkpoint.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 32 << 20
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32)}
_FLOAT_KINDS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16))
_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                       "*.model", "chat_template.jinja", "chat_template.json", "added_tokens.json")


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message is one actionable line."""


def convert(src: str, dst: str | Path, *, dtype: str = "auto", model_type: str | None = None,
            force: bool = False, progress: bool = True) -> Path:
    """Converts `src` into a jaxpaged checkpoint at `dst`; returns `dst`."""
    from jaxpaged.config import ModelConfig
    from jaxpaged.model_source import resolve_model

    dst = Path(dst).expanduser()
    if dst.exists() and (dst.is_file() or any(dst.iterdir())) and not force:
        raise ConversionError(f"{dst} already exists; pass --force to overwrite it")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype must be auto, bf16 or fp32, got {dtype!r}")
    source = resolve_model(src)
    if source.kind == "jaxpaged":
        raise ConversionError(f"{src} is already a jaxpaged checkpoint")
    hf = source.hf_config().to_dict()
    if model_type is not None:
        hf["model_type"] = model_type
    config = ModelConfig.from_hf_config(hf)  # refuses unsupported architectures and options
    if dtype == "auto":  # keep what the source holds: bf16 stays bf16, the rest (GGUF too) fp32
        dtype = "bf16" if config.torch_dtype in ("bfloat16", "float16") and source.kind != "gguf" else "fp32"
    params = read_params(config, source.weights(), DTYPES[dtype], progress=progress)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp"))
    try:
        _save_params(tmp / PARAMS_DIR, params)
        tokenizer_dir = source._config_dir()  # for a GGUF: its converted config and tokenizer
        for pattern in _TOKENIZER_PATTERNS:
            for file in tokenizer_dir.glob(pattern):
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, default=str))
        tokenizer = source.tokenizer()
        generation = source.generation_config(tokenizer)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        chat_template = tokenizer.chat_template
        metadata = {
            "format": FORMAT,
            "converter_version": CONVERTER_VERSION,
            "dtype": dtype,
            "model_config": dataclasses.asdict(config),
            "hf_config": hf,
            "chat_template": chat_template,
            "generation_config": generation,
            "source": {"name": source.name, "kind": source.kind,
                       "files": {str(f.relative_to(source.path if source.kind == "hf_dir"
                                                   else source.path.parent)): sha256(f)
                                 for f in source.files()}},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_params(config, weights, dtype: np.dtype, *, progress: bool = True) -> dict:
    """The params pytree as host numpy arrays of `dtype`, every tensor checked on the way."""
    import jax

    from jaxpaged.models.params import LeafAssembler, _is_spec, param_specs

    leaves, treedef = jax.tree.flatten(param_specs(config), is_leaf=_is_spec)
    assembler = LeafAssembler(leaves, error=ConversionError)
    loaded: list = [None] * len(leaves)
    bar = tqdm(total=len(leaves), desc="converting tensors", unit="tensor", disable=not progress)
    try:
        for name, array in _checked(weights):
            spec = assembler.spec_of(name)
            if spec is None:
                continue
            if array.dtype not in _FLOAT_KINDS:
                raise ConversionError(f"corrupted tensor {name}: dtype {array.dtype}, expected a "
                                      "float16/bfloat16/float32 tensor")
            if array.shape != spec.hf_shape_of(name):
                raise ConversionError(f"corrupted tensor {name}: shape {array.shape}, expected "
                                      f"{spec.hf_shape_of(name)} from the config")
            if array.dtype == np.float16:  # through float32: keeps ml_dtypes' casts exact
                array = array.astype(np.float32)
            leaf = assembler.add(name, array.astype(dtype))
            if leaf is not None:
                i, array = leaf
                loaded[i] = np.ascontiguousarray(array)
                bar.update()
    finally:
        bar.close()
    assembler.check_complete("the source")
    return jax.tree.unflatten(treedef, loaded)


def _checked(weights):
    """Re-raises a reader's failure on damaged files as one ConversionError line."""
    iterator = iter(weights)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (ValueError, FileNotFoundError):  # the readers' own one-line messages
            raise
        except Exception as error:  # safetensors/gguf raise their own types on truncated data
            text = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConversionError(f"corrupted checkpoint data: {text}") from None
        yield item


def _save_params(path: Path, params: dict) -> None:
    import jax
    import orbax.checkpoint as ocp

    # Chunks of at most 32 MiB: a sharded restore then reads (about) only each device's slice.
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.resolve(), params, save_args=save_args)


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
