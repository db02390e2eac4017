"""`jaxpaged convert`: round trips against loading the source directly, and the documented errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import jaxpaged
from conversions.convert import METADATA_FILE, ConversionError, convert, sha256
from conversions.orbax_loader import restore_params
from jaxpaged.cli import main
from jaxpaged.config import ModelConfig
from jaxpaged.model_source import resolve_model
from jaxpaged.models.params import load_params
from test_models import VOCAB, family_config, save_checkpoint
from test_tensor_parallel import check_against_tp1, run_tp


def check_bit_identical(ours: dict, expected: dict) -> None:
    paths = jax.tree.leaves_with_path(expected)
    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for (path, want), got in zip(paths, jax.tree.leaves(ours)):
        assert got.dtype == want.dtype, jax.tree_util.keystr(path)
        assert np.array_equal(np.asarray(got), np.asarray(want)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Tiny Qwen2 (q/k/v biases, untied head): every kind of leaf the converter writes."""
    path = tmp_path_factory.mktemp("qwen2")
    save_checkpoint(path, family_config("qwen2"))
    return path


@pytest.mark.parametrize("dtype, jax_dtype", [("fp32", jnp.float32), ("bf16", jnp.bfloat16)])
def test_hf_dir_round_trip_is_bit_identical(qwen2_dir, tmp_path, dtype, jax_dtype):
    dst = convert(str(qwen2_dir), tmp_path / "out", dtype=dtype, progress=False)
    source = resolve_model(str(dst))
    assert source.kind == "jaxpaged"
    config = ModelConfig.from_hf_config(source.hf_config())
    direct = load_params(ModelConfig.from_hf_config(resolve_model(str(qwen2_dir)).hf_config()),
                         resolve_model(str(qwen2_dir)).weights(), jax_dtype)
    check_bit_identical(restore_params(dst, config, jax_dtype), direct)

    metadata = json.loads((dst / METADATA_FILE).read_text())
    assert metadata["dtype"] == dtype and metadata["converter_version"]
    assert metadata["source"]["files"]["model.safetensors"] == sha256(qwen2_dir / "model.safetensors")
    assert metadata["model_config"]["num_kv_heads"] == 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).is_file(), name
    tokenizer, original = source.tokenizer(), resolve_model(str(qwen2_dir)).tokenizer()
    assert tokenizer.get_vocab() == original.get_vocab() and len(tokenizer.get_vocab()) >= VOCAB
    assert tokenizer.eos_token_id == original.eos_token_id is not None


def test_checkpoint_of_another_converter_version_is_refused(qwen2_dir, tmp_path):
    """Version 1 held q, k and v as three leaves: loading one asks for a new conversion."""
    dst = convert(str(qwen2_dir), tmp_path / "out", dtype="fp32", progress=False)
    metadata = json.loads((dst / METADATA_FILE).read_text())
    (dst / METADATA_FILE).write_text(json.dumps({**metadata, "converter_version": "1"}))
    config = ModelConfig.from_hf_config(resolve_model(str(dst)).hf_config())
    with pytest.raises(ValueError, match=r"converter 1, this one reads 2\); re-run jaxpaged convert"):
        restore_params(dst, config, jnp.float32)


def test_converted_dir_serves_as_model_and_restores_under_tp2(tmp_path):
    """4 query / 2 KV heads: TP=2 needs no padding, so orbax restores each leaf straight into its
    target sharding; the worker checks every leaf's sharding and TP=2 against TP=1."""
    save_checkpoint(tmp_path / "hf", family_config("llama"))
    dst = convert(str(tmp_path / "hf"), tmp_path / "out", dtype="fp32", progress=False)
    results = run_tp(str(dst), (1, 2), tmp_path / "out.npz", devices=2)
    check_against_tp1(results, (1, 2))


@pytest.mark.slow
def test_gguf_round_trip_gives_same_greedy_tokens(smollm2_path, smollm2_llm, tmp_path):
    dst = convert(str(smollm2_path), tmp_path / "smollm2", dtype="fp32", progress=False)
    metadata = json.loads((dst / METADATA_FILE).read_text())
    assert metadata["source"]["kind"] == "gguf" and "<|im_start|>" in metadata["chat_template"]
    converted = jaxpaged.LLM(model=str(dst), dtype="float32", max_model_len=512, max_num_seqs=8,
                             max_num_batched_tokens=64, num_pages=12, token_buckets=(4, 16, 64))
    check_bit_identical(converted.engine.params, smollm2_llm.engine.params)
    params = jaxpaged.SamplingParams(temperature=0, max_tokens=16)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ours = converted.generate(prompts, params, use_tqdm=False)
    expected = smollm2_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in expected]
    assert converted.engine.eos_token_ids == smollm2_llm.engine.eos_token_ids


# ---------------------------------------------------------------- errors


def test_refuses_to_overwrite_without_force(qwen2_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert(str(qwen2_dir), tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(str(qwen2_dir), tmp_path / "out", force=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / METADATA_FILE).is_file()


def test_unsupported_architecture(tmp_path):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        convert(str(tmp_path / "gpt2"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_weights_file(qwen2_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((qwen2_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert(str(src), tmp_path / "out", progress=False)


def _copy_with(qwen2_dir, tmp_path, edit):
    src = tmp_path / "src"
    src.mkdir()
    for file in qwen2_dir.iterdir():
        (src / file.name).write_bytes(file.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"][:-1]}),
     r"corrupted tensor model.layers.0.mlp.up_proj.weight: shape \(127, 96\), expected \(128, 96\)"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}),
     "corrupted tensor model.norm.weight: dtype int32"),
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     "missing tensors the model needs: model.layers.1.self_attn.k_proj.bias"),
])
def test_corrupted_tensors(qwen2_dir, tmp_path, edit, message):
    src = _copy_with(qwen2_dir, tmp_path, edit)
    with pytest.raises(ConversionError, match=message):
        convert(str(src), tmp_path / "out", progress=False)


def test_truncated_file_is_one_line_cli_error(qwen2_dir, tmp_path, capsys):
    src = _copy_with(qwen2_dir, tmp_path, lambda t: None)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("jaxpaged: error: corrupted checkpoint data: ")
    assert not (tmp_path / "out").exists()
