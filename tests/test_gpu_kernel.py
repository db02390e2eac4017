"""The GPU Pallas kernel against the pure-jnp oracle: interpret mode on CPU, compiled on a GPU."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference
from pallas_kernels.gpu import ragged_paged_attention_gpu

ROOT = Path(__file__).resolve().parents[1]


def make_batch(seqs, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, pad_tokens=0,
               pad_seqs=0, seed=0):
    """seqs: list of (q_len, kv_len). Unused pages and padding rows hold NaN / garbage."""
    rng = np.random.default_rng(seed)
    num_tokens = sum(ql for ql, _ in seqs) + pad_tokens
    num_seqs_max = len(seqs) + pad_seqs
    pages_per_seq = max(-(-kl // page_size) for _, kl in seqs) + 1
    num_pages = num_seqs_max * pages_per_seq + 3
    perm = rng.permutation(num_pages)
    page_indices = perm[: num_seqs_max * pages_per_seq].reshape(num_seqs_max, pages_per_seq)
    kv = rng.standard_normal(get_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim))
    used = np.zeros(kv.shape[:2], bool)  # positions [page, slot] inside some sequence's length
    for i, (_, kl) in enumerate(seqs):
        for p in range(kl):
            used[page_indices[i, p // page_size], p % page_size] = True
    kv[~used] = np.nan
    q_lens = [ql for ql, _ in seqs] + [0] * pad_seqs
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    kv_lens = [kl for _, kl in seqs] + [0] * pad_seqs
    r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return (r(num_tokens, num_q_heads, head_dim), r(num_tokens, num_kv_heads, head_dim),
            r(num_tokens, num_kv_heads, head_dim), jnp.asarray(kv, dtype), jnp.asarray(kv_lens, jnp.int32),
            jnp.asarray(page_indices, jnp.int32), jnp.asarray(cu, jnp.int32), jnp.asarray([len(seqs)], jnp.int32))


def check_against_reference(seqs, *, interpret, dtype=jnp.float32, num_q_heads=4, num_kv_heads=1, head_dim=64, page_size=8,
          q_block_size=4, pages_per_kv_block=2, atol=1e-4, **kw):
    args = make_batch(seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      page_size=page_size, dtype=dtype, pad_tokens=kw.pop("pad_tokens", 0),
                      pad_seqs=kw.pop("pad_seqs", 0))
    static = dict(sm_scale=head_dim**-0.5, **kw)
    want, want_kv = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **static))(*args)
    got, got_kv = jax.jit(lambda *a: ragged_paged_attention_gpu(
        *a, q_block_size=q_block_size, pages_per_kv_block=pages_per_kv_block, interpret=interpret, **static))(*args)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
    np.testing.assert_array_equal(np.asarray(got_kv, np.float32), np.asarray(want_kv, np.float32))


# (q_len, kv_len) lists
DECODE = [(1, 5), (1, 17), (1, 1)]
PREFILL = [(7, 7), (9, 20)]
MIXED = [(1, 12), (0, 9), (6, 6), (1, 3), (5, 19)]

CPU_CASES = [
    dict(seqs=DECODE, q_block_size=1),
    dict(seqs=PREFILL),
    dict(seqs=MIXED, pad_tokens=3, pad_seqs=2),
    dict(seqs=MIXED, page_size=16, num_q_heads=2, num_kv_heads=2, pages_per_kv_block=1),
    dict(seqs=PREFILL, sliding_window=5),
    dict(seqs=MIXED, soft_cap=5.0, pad_tokens=2),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k != "seqs"))
def test_interpret_matches_reference(case):
    check_against_reference(interpret=True, **case)


def test_interpret_head_dim_128():
    check_against_reference(interpret=True, seqs=[(1, 9), (3, 10)], head_dim=128, num_q_heads=2, num_kv_heads=2)


def test_bench_smoke():
    res = subprocess.run([sys.executable, "benchmarks/gpu_kernel_bench.py", "--smoke", "--interpret"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pallas" in res.stdout


GPU_SEQS = [
    [(1, 100), (1, 513), (1, 2000), (1, 1)],
    [(200, 200), (37, 300), (1, 64)],
    [(1, 33), (0, 40), (65, 65), (1, 900), (17, 129)],
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("seqs", GPU_SEQS)
@pytest.mark.parametrize("page_size,heads", [(16, (32, 8)), (16, (8, 8)), (32, (16, 4))])
def test_compiled_matches_reference(dtype, atol, seqs, page_size, heads):
    check_against_reference(seqs, interpret=False, dtype=dtype, atol=atol, num_q_heads=heads[0], num_kv_heads=heads[1],
          head_dim=128, page_size=page_size, q_block_size=16, pages_per_kv_block=4, pad_tokens=5, pad_seqs=1)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(sliding_window=100), dict(soft_cap=30.0), dict(q_block_size=1)])
def test_compiled_options(kw):
    check_against_reference(GPU_SEQS[2] if "q_block_size" not in kw else GPU_SEQS[0], interpret=False, dtype=jnp.bfloat16,
          atol=3e-2, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
          **{"q_block_size": 16, **kw})
