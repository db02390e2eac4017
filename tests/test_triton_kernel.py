"""The official-Triton decode kernel (pallas_kernels/triton_decode.py) against independent oracles.

CPU: Triton's interpreter runs the kernels on torch CPU tensors (through `interpret_call`, which
keeps jax_triton's calling convention), compared with the float64 numpy oracle on NaN-filled
ragged batches. The interpreter needs TRITON_INTERPRET=1 before triton is imported, so those
cases run in a subprocess (`test_interpreter_cases`). GPU: the jax_triton path, compiled, against
the pure-jnp reference with test_gpu_kernel.py's tolerances.
"""

import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("triton", reason="the Triton kernel needs the triton package (pip install triton==3.6.0)")

from pallas_kernels import get_kv_cache_shape  # noqa: E402
from pallas_kernels.gpu import ragged_paged_attention_gpu  # noqa: E402
from pallas_kernels.reference import ragged_paged_attention_reference  # noqa: E402
from test_reference_attention import BF16, F32, make_batch, oracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETING, reason="run by test_interpreter_cases (TRITON_INTERPRET=1)")


def test_interpreter_cases():
    if INTERPRETING:
        pytest.skip("already inside the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interpret",
                          "tests/test_triton_kernel.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout


# ---- interpreter (CPU): the kernel alone, then through the op ----

# page_size, head_dim, num_q_heads, num_kv_heads, sliding_window, soft_cap, dtype, kernel options
KERNEL_CASES = [
    (16, 64, 2, 2, None, None, F32, dict(num_splits=1)),  # GQA 1, no split
    (32, 64, 9, 3, 7, None, F32, dict(num_splits=3)),  # GQA 3 (padded to 4), window, fused merge
    (16, 128, 4, 1, None, 2.0, F32, dict(num_splits=2, merge="kernel")),  # GQA 4, soft-cap, merge launch
    (64, 64, 16, 2, 40, 3.0, F32, {}),  # GQA 8, window + cap, splits from the grid
    (128, 256, 6, 2, None, None, F32, dict(num_splits=2, block_n=64)),  # head_dim 256, half pages
    (16, 64, 8, 2, 20, None, BF16, dict(num_splits=4, block_n=32)),  # bf16, 2 pages per iteration
]

# Decodes (q_len 1) at and across page boundaries, a prefill and a q_len-0 sequence between them
# (their rows must stay untouched), plus make_batch's padding tokens and garbage padding sequences.
SEQS = [(1, 1), (1, 16), (5, 20), (1, 17), (0, 9), (1, 70), (1, 33), (1, 128), (1, 129)]


def kernel_id(case):
    return "ps{}-d{}-h{}x{}-w{}-cap{}-{}-{}".format(*case[:6], np.dtype(case[6]).name, "-".join(f"{k}{v}" for k, v in case[7].items()))


@interpreter_only
@pytest.mark.parametrize("case", KERNEL_CASES, ids=kernel_id)
def test_interpret_kernel_matches_oracle(case):
    from pallas_kernels.triton_decode import decode_attention_triton

    page_size, head_dim, hq, hkv, window, cap, dtype, opts = case
    rng = np.random.default_rng(zlib.crc32(kernel_id(case).encode()))
    seqs = list(SEQS)
    rng.shuffle(seqs)
    args = make_batch(rng, seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim, dtype=dtype)
    static = dict(sm_scale=head_dim**-0.5, sliding_window=window, soft_cap=cap)
    want, kv_written = oracle(*args, **static)  # the kernel reads a cache that holds the new K/V
    q, kv_lens, page_indices, cu_q_lens, num_seqs = args[0], *args[4:]
    before = rng.standard_normal(q.shape).astype(dtype)  # rows the kernel must leave alone
    got = jax.jit(lambda *a: decode_attention_triton(*a, interpret=True, **static, **opts))(
        before, q, kv_written, kv_lens, page_indices, cu_q_lens, num_seqs)
    got = np.asarray(got)

    decode_rows = [cu_q_lens[i] for i, (q_len, _) in enumerate(seqs) if q_len == 1]
    others = np.setdiff1d(np.arange(q.shape[0]), decode_rows)
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(got[decode_rows].astype(np.float32), want[decode_rows], atol=tol, rtol=tol)
    np.testing.assert_array_equal(got[others].view(np.uint8), before[others].view(np.uint8))


@interpreter_only
@pytest.mark.parametrize("merge", ["fused", "kernel"])
def test_interpret_op_mixed_batch(merge):
    # The whole op with decode_impl="triton": Pallas KV write and prefill (interpret mode), Triton
    # decode; outputs against the float64 oracle, the cache bitwise against the oracle's writes.
    rng = np.random.default_rng(3 if merge == "fused" else 4)
    seqs = [(1, 40), (6, 6), (1, 1), (3, 50), (1, 65), (0, 12)]
    args = make_batch(rng, seqs, page_size=16, num_q_heads=12, num_kv_heads=4, head_dim=64, dtype=F32)
    static = dict(sm_scale=0.125, sliding_window=30, soft_cap=None)
    got, got_kv = jax.jit(lambda *a: ragged_paged_attention_gpu(
        *a, q_block_size=4, kv_block_size=16, decode_impl="triton", decode=dict(num_splits=3, merge=merge),
        interpret=True, **static))(*args)
    want, want_kv = oracle(*args, **static)
    n = args[6][args[7][0]]  # real tokens; padding tokens' outputs are zeros
    got = np.asarray(got)
    np.testing.assert_allclose(got[:n], want[:n], atol=1e-5, rtol=1e-5)
    assert not got[n:].any()
    np.testing.assert_array_equal(np.asarray(got_kv).view(np.uint32), want_kv.view(np.uint32))


def test_bad_options_are_clear_errors():
    rng = np.random.default_rng(0)
    args = make_batch(rng, [(1, 5)], page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=F32)
    with pytest.raises(ValueError, match="decode_impl must be one of"):
        ragged_paged_attention_gpu(*args, sm_scale=0.1, decode_impl="cuda", interpret=True)
    with pytest.raises(ValueError, match="unknown decode options"):
        ragged_paged_attention_gpu(*args, sm_scale=0.1, decode_impl="triton", decode=dict(pages_per_iter=2),
                                   interpret=True)
    with pytest.raises(ValueError, match="merge must be"):
        ragged_paged_attention_gpu(*args, sm_scale=0.1, decode_impl="triton", decode=dict(merge="atomic"),
                                   interpret=True)


# ---- compiled (GPU, jax_triton) against the pure-jnp reference ----
# Kernel-level cases start from the reference's output with the decode rows zeroed and its
# updated cache, so the result must equal the reference everywhere (prefill, q_len-0 and padding
# rows untouched); that compiles only the reference and the Triton kernel per case.

GPU_MIXED = [(1, 33), (0, 40), (65, 65), (1, 900), (17, 129), (1, 1), (1, 4097)]
GPU_DECODES = [(1, 100), (1, 513), (1, 2000), (1, 1), (1, 16000), (1, 64)]


def gpu_batch(seqs, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, seed=0):
    """seqs: list of (q_len, kv_len), plus 5 padding tokens and a padding sequence. Only pages
    some sequence uses exist (long contexts stay cheap); every slot outside a length is NaN."""
    rng = np.random.default_rng(seed)
    owned = [-(-kl // page_size) for _, kl in seqs]
    num_pages = sum(owned) + 3
    pages_per_seq = max(owned) + 1
    page_indices = rng.integers(0, num_pages, (len(seqs) + 1, pages_per_seq))  # spare columns: garbage ids
    page_indices[:-1, :max(owned)] = -1
    perm, taken = rng.permutation(num_pages), 0
    kv = np.full(get_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim), np.nan, np.float32)
    for i, (_, kl) in enumerate(seqs):
        page_indices[i, : owned[i]] = perm[taken : taken + owned[i]]
        taken += owned[i]
        pos = np.arange(kl)
        kv[page_indices[i, pos // page_size], pos % page_size] = rng.standard_normal((kl, 2 * num_kv_heads, head_dim))
    num_tokens = sum(ql for ql, _ in seqs) + 5
    cu = np.concatenate([[0], np.cumsum([ql for ql, _ in seqs]), [num_tokens - 5]])
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return (r(num_tokens, num_q_heads, head_dim), r(num_tokens, num_kv_heads, head_dim), r(num_tokens, num_kv_heads, head_dim),
            jnp.asarray(kv, dtype), jnp.asarray([kl for _, kl in seqs] + [0], jnp.int32), jnp.asarray(page_indices, jnp.int32),
            jnp.asarray(cu, jnp.int32), jnp.asarray([len(seqs)], jnp.int32))


def gpu_case(seqs, *, dtype, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16, **static):
    args = gpu_batch(seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     page_size=page_size, dtype=dtype)
    static = dict(sm_scale=head_dim**-0.5, **static)
    want, want_kv = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **static))(*args)
    return args, static, want, want_kv


def assert_close(got, want, atol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)


def check_kernel_on_gpu(seqs, *, dtype, atol, decode=None, **kw):
    from pallas_kernels.triton_decode import decode_attention_triton

    args, static, want, want_kv = gpu_case(seqs, dtype=dtype, **kw)
    cu = np.asarray(args[6])
    decode_rows = [cu[i] for i, (q_len, _) in enumerate(seqs) if q_len == 1]
    start = want.at[jnp.asarray(decode_rows)].set(0)
    got = jax.jit(lambda out, q, kv, *meta: decode_attention_triton(out, q, kv, *meta, **static, **(decode or {})))(
        start, args[0], want_kv, *args[4:])
    assert_close(got, want, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("page_size,heads,head_dim", [(16, (32, 8), 128), (64, (9, 3), 64), (128, (16, 4), 128)])
def test_compiled_kernel_matches_reference(dtype, atol, page_size, heads, head_dim):
    check_kernel_on_gpu(GPU_MIXED, dtype=dtype, atol=atol, num_q_heads=heads[0], num_kv_heads=heads[1],
                        head_dim=head_dim, page_size=page_size)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [
    dict(sliding_window=100), dict(soft_cap=30.0), dict(head_dim=256, page_size=32), dict(head_dim=64, page_size=64),
    dict(decode=dict(num_splits=1)),
    dict(decode=dict(num_splits=32, block_n=64)),  # fused merge, 32 programs per (sequence, head)
    dict(decode=dict(num_splits=7, merge="kernel"), sliding_window=5000, page_size=128),
    dict(dtype=jnp.float32, atol=2e-3, num_q_heads=8, num_kv_heads=2, page_size=64, decode=dict(num_splits=16)),
], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()).replace(" ", ""))
def test_compiled_kernel_options(kw):
    kw = {"dtype": jnp.bfloat16, "atol": 3e-2, **kw}
    check_kernel_on_gpu(GPU_DECODES, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,page_size,heads,head_dim", [
    (jnp.bfloat16, 3e-2, 64, (32, 8), 128), (jnp.float32, 2e-3, 16, (9, 3), 64)])
def test_compiled_op_matches_reference(dtype, atol, page_size, heads, head_dim):
    # The whole op with decode_impl="triton": Pallas KV write + prefill, Triton decode.
    args, static, want, want_kv = gpu_case(GPU_MIXED, dtype=dtype, num_q_heads=heads[0], num_kv_heads=heads[1],
                                           head_dim=head_dim, page_size=page_size)
    got, got_kv = jax.jit(lambda *a: ragged_paged_attention_gpu(
        *a, q_block_size=16, kv_block_size=32, decode_impl="triton", **static))(*args)
    assert_close(got, want, atol)
    np.testing.assert_array_equal(np.asarray(got_kv, np.float32), np.asarray(want_kv, np.float32))


def test_bench_smoke_triton():
    res = subprocess.run([sys.executable, "benchmarks/gpu_kernel_bench.py", "--smoke", "--interpret", "--decode-impl",
                          "triton", "--kernel-only", "--no-ref"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert " triton " in res.stdout and " triton_kernel " in res.stdout
