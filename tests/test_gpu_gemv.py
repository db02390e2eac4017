"""Decode-sized linear layers (`pallas_kernels.gpu_gemv`): the kernels against their jnp
references (the model's own composition) in interpret mode (CPU) and compiled (GPU-marked), their
CUDA lowering on any host, and the engine running them against transformers as the oracle."""

import functools

import numpy as np
import pytest
from test_models import ENGINE_ARGS, PROMPT_LENS, VOCAB, family_config, run_engine, save_checkpoint, transformers_logits

import jax
import jax.numpy as jnp
import jaxpaged
from jaxpaged import runner as runner_module
from jaxpaged.models.layers import GemvOps
from pallas_kernels.gpu_gemv import (matmul_add_gpu, matmul_add_reference, rms_norm_matmul_gpu,
                                     rms_norm_matmul_reference, rms_norm_swiglu_gpu,
                                     rms_norm_swiglu_reference)

EPS = 1e-5


def inputs(num_rows, k_dim, widths, dtype, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    x = arr((num_rows, k_dim), 3.0)  # not unit rms, so a missing norm shows
    norm = jnp.asarray(1.0 + 0.5 * rng.standard_normal(k_dim), dtype)
    weights = tuple(arr((k_dim, n), k_dim ** -0.5) for n in widths)
    gate_up = arr((k_dim, 2, widths[0]), k_dim ** -0.5)
    residual = arr((num_rows, widths[0]))
    return x, norm, weights, gate_up, residual


def run_ops(x, norm, weights, gate_up, residual, *, interpret, config=None):
    kw = dict(interpret=interpret, config=config)
    return (rms_norm_matmul_gpu(x, norm, weights, eps=EPS, **kw),
            rms_norm_swiglu_gpu(x, norm, gate_up, eps=EPS, **kw),
            matmul_add_gpu(x, weights[0], residual, **kw))


def references(x, norm, weights, gate_up, residual):
    return (rms_norm_matmul_reference(x, norm, weights, eps=EPS),
            rms_norm_swiglu_reference(x, norm, gate_up, eps=EPS),
            matmul_add_reference(x, weights[0], residual))


def check_close(outs, refs, dtype):
    # float32: summation order only. bf16: the kernel does not round the normed rows before the
    # product (the model does) and sums in another order: a few bf16 steps on outputs of size ~1.
    atol, rtol = (2e-5, 2e-5) if dtype == jnp.float32 else (0.06, 0.03)
    for name, out, ref in zip(("rms_norm_matmul", "rms_norm_swiglu", "matmul_add"), outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=atol, rtol=rtol, err_msg=name)


# (rows, K, widths, config): one row and 8 (dot tiles of 16, rows masked), 33 (a 64-row tile);
# K a multiple of block_k or not (96 = 64 + 32: a masked K edge), widths a multiple of block_n or
# not (48 with 32 columns a program), three weights side by side (q, k, v).
SHAPES = [
    (1, 64, (64, 32, 32), (32, 32, 4, 2)),
    (8, 96, (48, 16, 16), (32, 64, 4, 2)),
    (33, 128, (96,), (16, 64, 4, 2)),
    (64, 256, (128, 64), None),
]


@pytest.mark.parametrize("num_rows, k_dim, widths, config", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_interpret_kernels_match_references(num_rows, k_dim, widths, config, dtype):
    args = inputs(num_rows, k_dim, widths, dtype)
    check_close(run_ops(*args, interpret=True, config=config), references(*args), dtype)


def test_the_norm_and_the_residual_matter():
    """The oracle discriminates: dropping the norm weight or the residual changes the outputs."""
    x, norm, weights, gate_up, residual = inputs(8, 64, (32,), jnp.float32)
    ours = run_ops(x, norm, weights, gate_up, residual, interpret=True)
    assert not np.allclose(ours[0], rms_norm_matmul_reference(x, jnp.ones_like(norm), weights, eps=EPS), atol=1e-3)
    assert not np.allclose(ours[2], x @ weights[0], atol=1e-3)


def test_bad_shapes_are_clear_errors():
    x, norm, weights, gate_up, residual = inputs(8, 64, (32,), jnp.float32)
    with pytest.raises(ValueError, match="takes 1..64 rows"):
        rms_norm_matmul_gpu(jnp.zeros((65, 64)), norm, weights, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        rms_norm_swiglu_gpu(jnp.zeros((8, 32)), norm, gate_up, eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="expected shapes"):
        matmul_add_gpu(x, weights[0], residual[:, :16], interpret=True)


def test_kernels_lower_for_cuda_on_any_host():
    bf16 = jnp.bfloat16
    x, norm = jnp.zeros((8, 4096), bf16), jnp.zeros(4096, bf16)
    qkv = (jnp.zeros((4096, 4096), bf16), jnp.zeros((4096, 1024), bf16), jnp.zeros((4096, 1024), bf16))
    cases = [("rms_norm_matmul", functools.partial(rms_norm_matmul_gpu, eps=EPS), (x, norm, qkv)),
             ("rms_norm_swiglu", functools.partial(rms_norm_swiglu_gpu, eps=EPS),
              (x, norm, jnp.zeros((4096, 2, 14336), bf16))),
             ("matmul_add", matmul_add_gpu, (jnp.zeros((8, 14336), bf16), jnp.zeros((14336, 4096), bf16), x))]
    for name, op, args in cases:
        assert name in jax.jit(op).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# ---- the engine with the kernels in its small buckets, against transformers

GEMV_ROWS = 16  # the test engine's buckets are (16, 32): the first runs the kernels, the second XLA
ATOL = 1e-4


def interpret_ops(*args, **kwargs):
    ops = (rms_norm_matmul_gpu, rms_norm_swiglu_gpu, matmul_add_gpu)
    return GemvOps(*(functools.partial(op, interpret=True) for op in ops), max_rows=GEMV_ROWS)


def check_engine(family, tmp_path):
    model = save_checkpoint(tmp_path, family_config(family))
    llm = jaxpaged.LLM(model=str(tmp_path), **ENGINE_ARGS)
    runner = llm.engine.runner
    for kind, programs in (("forward", runner._forward_programs), ("decode", runner._decode_programs)):
        for bucket, program in programs.items():
            text = program.as_text()
            for kernel in ("rms_norm_matmul", "rms_norm_swiglu", "matmul_add"):
                assert (kernel in text) == (bucket <= GEMV_ROWS), (kind, bucket, kernel)
    rng = np.random.default_rng(len(family))
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
    for prompt, steps in zip(prompts, run_engine(llm, prompts, 16)):
        ours = np.stack([logits for logits, _ in steps])
        tokens = [token for _, token in steps]
        expected = transformers_logits(model, prompt + tokens, len(prompt))
        diff = np.abs(ours - expected).max(axis=-1)
        assert diff.max() < ATOL, f"{family}, {len(prompt)}-token prompt: step {int(diff.argmax())} differs by {diff.max():.2e}"
        assert tokens == expected.argmax(axis=-1).tolist()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_engine_with_interpret_kernels_matches_transformers(family, tmp_path, monkeypatch):
    """Decode steps (16-token bucket) run all three kernels; q/k/v biases (qwen2) and q/k norms
    (qwen3) apply to their output."""
    monkeypatch.setattr(runner_module, "pick_gemv_ops", interpret_ops)
    check_engine(family, tmp_path)


# ---- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows, k_dim, widths, config", SHAPES + [(8, 4096, (4096, 1024, 1024), None)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_match_references(num_rows, k_dim, widths, config, dtype):
    args = inputs(num_rows, k_dim, widths, dtype)
    with jax.default_matmul_precision("highest"):
        refs = references(*args)
    check_close(run_ops(*args, interpret=False, config=config), refs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_engine_on_gpu_matches_transformers(family, tmp_path, monkeypatch):
    """The runner's own pick (float32, highest precision elsewhere), its small bucket set to 16."""
    monkeypatch.setattr(runner_module, "GEMV_MAX_ROWS", GEMV_ROWS)
    with jax.default_matmul_precision("highest"):
        check_engine(family, tmp_path)
