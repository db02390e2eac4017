"""The GPU Pallas kernel against the pure-jnp oracle: interpret mode on CPU, compiled on a GPU."""

import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import get_kv_cache_shape, gpu_decode, gpu_splits, ragged_paged_attention_reference
from pallas_kernels.gpu import ragged_paged_attention_gpu
from pallas_kernels.reference import ragged_paged_attention_reference_jit
from test_reference_attention import F32, oracle, scenario
from test_reference_attention import make_batch as ref_make_batch

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


def rotate_half(x, cos, sin):
    """The rotary embedding in numpy float32, cast back: x [T, H, D], cos/sin [T, D]."""
    x32 = np.asarray(x, np.float32)
    half = x32.shape[-1] // 2
    rotated = np.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return jnp.asarray(x32 * cos[:, None, :] + rotated * sin[:, None, :], x.dtype)


def check_against_reference(seqs, *, interpret, dtype=jnp.float32, num_q_heads=4, num_kv_heads=1, head_dim=64, page_size=8,
          q_block_size=4, kv_block_size=16, atol=1e-4, kv_dtype=None, prefill_impl="pallas", **kw):
    """kv_dtype: the cache's dtype when it differs from q/k/v's (an FP8 cache); then one new
    key holds values past e4m3's largest, which both ops must saturate alike. prefill_impl: the
    GPU op's path for first chunks (the reference has one path)."""
    args = make_batch(seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      page_size=page_size, dtype=dtype, pad_tokens=kw.pop("pad_tokens", 0),
                      pad_seqs=kw.pop("pad_seqs", 0))
    if kv_dtype is not None:
        k = args[1].at[0, 0, :2].set(jnp.asarray([1e5, -1e5], dtype))
        args = (args[0], k, args[2], args[3].astype(kv_dtype), *args[4:])
    decode, decode_only = kw.pop("decode", None), kw.pop("decode_only", False)
    # fused_merge: the split merge inside the decode-only kernel, with the counters it leaves zero
    counts = jnp.zeros(args[0].shape[0] * num_kv_heads + 3, jnp.int32) if kw.pop("fused_merge", False) else None
    rope = None
    if kw.pop("rope", False):  # the op rotates q and k itself: the reference gets them rotated
        rng = np.random.default_rng(1)  # any tables, so halves and signs mixed up would show
        rope = tuple(rng.uniform(-1, 1, (args[0].shape[0], head_dim)).astype(np.float32) for _ in "cs")
        ref_args = (rotate_half(args[0], *rope), rotate_half(args[1], *rope), *args[2:])
    static = dict(sm_scale=head_dim**-0.5, **kw)
    want, want_kv = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **static))(*(ref_args if rope else args))
    got, got_kv, *got_counts = jax.jit(lambda *a: ragged_paged_attention_gpu(
        *a, q_block_size=q_block_size, kv_block_size=kv_block_size, decode=decode, decode_only=decode_only,
        rope=rope, interpret=interpret, counts=counts, prefill_impl=prefill_impl,
        **static))(*args)
    if counts is not None:
        assert np.asarray(got_counts[0]).tolist() == [0] * counts.shape[0]
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=atol, rtol=atol)
    got_kv, want_kv = np.asarray(got_kv, np.float32), np.asarray(want_kv, np.float32)
    if rope is None:
        np.testing.assert_array_equal(got_kv, want_kv)
    else:  # new keys rotated in the kernel: equal to rounding (NaN where the reference has NaN)
        # (in an FP8 cache a rounding difference can move a value by one e4m3 step, 2^-3)
        rtol = 2.0**-3 if kv_dtype is not None else 1e-6
        np.testing.assert_allclose(got_kv, want_kv, rtol=rtol, atol=1e-6 if dtype == jnp.float32 else 1e-2)
        np.testing.assert_array_equal(np.isnan(got_kv), np.isnan(want_kv))


# ---- interpret mode (CPU) against the float64 oracle and the reference's cache, NaN-filled batches ----

# page_size, head_dim, num_q_heads, num_kv_heads, sliding_window, soft_cap, kv_chunk_size (unused),
# q_block_size, dtype: the tuple of test_reference_attention.CONFIGS, plus kernel options.
INTERPRET_CASES = [
    ("decode", (16, 64, 2, 2, None, None, 0, 4, F32), dict(decode=dict(num_splits=1))),  # GQA 1
    ("prefill", (32, 64, 9, 3, 7, None, 0, 4, F32), dict(kv_block_size=16)),  # GQA 3 padded to 4, window, half-page KV blocks
    ("mixed", (16, 128, 4, 1, None, 2.0, 0, 8, F32), dict(decode=dict(num_splits=3, pages_per_iter=2))),  # GQA 4, cap
    ("mixed", (64, 64, 16, 2, 40, 3.0, 0, 4, F32), {}),  # GQA 8, window + cap, split by default
    ("mixed", (128, 256, 6, 2, None, None, 0, 2, F32), dict(decode=dict(num_splits=2, pages_per_iter=1))),  # head_dim 256
    ("decode", (16, 64, 12, 4, 20, None, 0, 4, F32), dict(decode=dict(num_splits=4, pages_per_iter=1))),  # splits + window
]


def case_id(case):
    name, c, opts = case
    return f"{name}-ps{c[0]}-d{c[1]}-h{c[2]}x{c[3]}-w{c[4]}-cap{c[5]}-q{c[7]}-{len(opts)}opts"


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
def test_interpret_matches_oracle(case):
    name, config, opts = case
    page_size, head_dim, hq, hkv, window, cap, _, bq, dtype = config
    rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
    seqs = scenario(name, min(page_size, 16))  # lengths at and across page boundaries
    seqs += [(1, page_size), (1, page_size + 1)] if name != "prefill" else [(page_size, page_size + 1)]
    rng.shuffle(seqs)
    args = ref_make_batch(rng, seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
                          dtype=dtype)
    static = dict(sm_scale=head_dim**-0.5, sliding_window=window, soft_cap=cap)
    got, got_kv = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, q_block_size=bq, interpret=True, **opts, **static))(*args)
    _, want_kv = ragged_paged_attention_reference_jit(*args, **static)
    want, _ = oracle(*args, **static)
    got = np.asarray(got)
    assert np.isfinite(got).all()  # padding tokens' q/k/v and every unused slot are NaN
    n = args[6][args[7][0]]  # real tokens; padding tokens' outputs are zeros
    np.testing.assert_allclose(got[:n], want[:n], atol=1e-5, rtol=1e-5)
    assert not got[n:].any()
    # Bitwise: the written slots hold the new k/v; every other slot (NaN included) is untouched.
    np.testing.assert_array_equal(np.asarray(got_kv).view(np.uint32), np.asarray(want_kv).view(np.uint32))


@pytest.mark.parametrize("seqs", [[(1, 100), (1, 37)], [(1, 100)], [(1, 100), (1, 37), (5, 40), (1, 16)]])
def test_interpret_splits_follow_the_slots_in_use(monkeypatch, seqs):
    # With 4 "SMs" of 2 resident programs (a wave of 8), a grid of 4 slots x 2 KV heads has room
    # for 4 splits; the step uses 8 // (decode sequences x 2) of them, and the programs past that
    # read nothing.
    monkeypatch.setattr(gpu_splits, "NUM_SMS", 4)
    monkeypatch.setattr(gpu_decode, "NUM_SMS", 4)
    wave = gpu_splits.wave_size(tile_bytes=2 * 16 * 64 * 4, num_stages=3)  # 1 page of 16 keys, float32
    assert wave == 4 * gpu_splits.MAX_PROGRAMS_PER_SM
    monkeypatch.setattr(gpu_splits, "MAX_PROGRAMS_PER_SM", 2)
    wave = gpu_splits.wave_size(tile_bytes=2 * 16 * 64 * 4, num_stages=3)
    assert wave == 8 and gpu_splits.wave_size(tile_bytes=100 << 10, num_stages=3) == 4  # 1 per SM
    assert gpu_splits.num_splits_for(4, 2, pages_per_seq=8, pages_per_iter=1, wave=wave) == 4
    num_decode = sum(q == 1 for q, _ in seqs)
    assert int(gpu_splits.split_count(jnp.int32(num_decode), 2, 4, wave)) == max(1, 8 // (2 * num_decode))
    pad = 4 - len(seqs)
    check_against_reference(seqs, interpret=True, num_q_heads=4, num_kv_heads=2, page_size=16,
                            pad_seqs=pad, pad_tokens=max(pad, 4 - sum(q for q, _ in seqs)),
                            decode=dict(pages_per_iter=1))


def test_min_splits_by_chip(monkeypatch):
    # On the H200 a decode-only step whose sequences alone fill at most one wave splits in two;
    # past one wave, and on other chips, the one-wave rule stands.
    assert gpu_splits.min_splits_for("NVIDIA H200") == 2
    assert gpu_splits.min_splits_for("NVIDIA H100 80GB HBM3") == gpu_splits.min_splits_for("cpu") == 1
    split = lambda n, min_splits: int(gpu_splits.split_count(jnp.int32(n), 8, 4, 264, min_splits=min_splits))
    assert (split(32, 1), split(32, 2), split(17, 2), split(33, 2), split(34, 2), split(64, 2)) == (1, 2, 2, 2, 1, 1)
    assert split(16, 2) == split(16, 1) == 2 and split(4, 2) == 4
    assert gpu_splits.decode_only_programs(32, 32, 8, 4, None, 264, min_splits=2) == 32 * 8 * 2

    # Through the op in interpret mode, with a wave of 8 (4 "SMs" x 2): 4 sequences x 2 KV heads
    # fill it, so one split unless min_splits says two (the longest sequence, 100 keys, past the
    # threshold); the outputs match the reference.
    monkeypatch.setattr(gpu_splits, "NUM_SMS", 4)
    monkeypatch.setattr(gpu_decode, "NUM_SMS", 4)
    monkeypatch.setattr(gpu_splits, "MAX_PROGRAMS_PER_SM", 2)
    monkeypatch.setattr(gpu_decode, "MIN_SPLITS_KEYS", 64)
    assert int(gpu_splits.split_count(jnp.int32(4), 2, 4, 8, min_splits=2)) == 2
    check_against_reference([(1, 100), (1, 37), (1, 16), (1, 70)], interpret=True, num_q_heads=4, num_kv_heads=2,
                            page_size=16, pad_tokens=2, decode_only=True, decode=dict(pages_per_iter=1, min_splits=2))


@pytest.mark.parametrize("page_size,kv_block_size,kw", [(16, 16, {}), (32, 16, dict(soft_cap=5.0)),
                                                      (8, 16, {}), (16, 16, dict(sliding_window=24))])
def test_interpret_prefill_blocks_before_the_first_query(page_size, kv_block_size, kw):
    # Query blocks whose first position lies past whole KV blocks (a fresh 70-token prompt, a
    # 20-token chunk after a 50-token cached prefix) attend those blocks without the causal mask:
    # read as one slice of a page (page >= block) or gathered across pages (page 8); with a
    # sliding window every block stays masked. NaN in unused pages and padding rows.
    check_against_reference([(70, 70), (20, 70), (1, 40), (33, 33)], interpret=True, num_q_heads=8,
                            num_kv_heads=2, page_size=page_size, kv_block_size=kv_block_size,
                            q_block_size=4, pad_tokens=3, pad_seqs=1, **kw)


DECODE_ONLY_CASES = [
    # (seqs, heads (q, kv), head_dim, page_size, options)
    ([(1, 100), (1, 37), (1, 16), (1, 1)], (4, 2), 64, 16, dict(decode=dict(pages_per_iter=1))),  # splits from the grid
    ([(1, 100), (1, 37), (1, 33)], (9, 3), 64, 16, dict(decode=dict(num_splits=3, pages_per_iter=2), sliding_window=20)),
    ([(1, 64), (1, 65)], (2, 2), 128, 32, dict(decode=dict(num_splits=1, pages_per_iter=1), soft_cap=2.0)),  # one split: rows stored directly
    ([(1, 8)], (32, 8), 64, 8, dict(decode=dict(pages_per_iter=1))),  # one token, one page
    ([(1, 100)], (4, 2), 64, 16, dict(decode=dict(pages_per_iter=1), pad_tokens=13)),  # batch 1 in a 16-token bucket
    # rope rotated in the kernel: several splits, one split, a window and a soft-cap, GQA 3
    ([(1, 100), (1, 37), (1, 16), (1, 1)], (4, 2), 64, 16, dict(decode=dict(pages_per_iter=1), rope=True)),
    ([(1, 64), (1, 65)], (2, 2), 128, 32, dict(decode=dict(num_splits=1, pages_per_iter=1), soft_cap=2.0, rope=True)),
    ([(1, 100), (1, 37), (1, 33)], (9, 3), 64, 16, dict(decode=dict(num_splits=3, pages_per_iter=2), sliding_window=20,
                                                       rope=True)),
]


@pytest.mark.parametrize("fused_merge", [False, True], ids=["xla_merge", "fused_merge"])
@pytest.mark.parametrize("seqs,heads,head_dim,page_size,opts", DECODE_ONLY_CASES)
def test_interpret_decode_only_matches_reference(seqs, heads, head_dim, page_size, opts, fused_merge):
    # Padding tokens and sequences past num_seqs; unused cache slots hold NaN. The new K/V is
    # written by the decode kernel itself: the cache must equal the reference's bit for bit.
    opts = {"pad_tokens": 2, "fused_merge": fused_merge, **opts}
    check_against_reference(seqs, interpret=True, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                            page_size=page_size, pad_seqs=1, decode_only=True, **opts)


FP8_CASES = [
    # (seqs, heads (q, kv), head_dim, page_size, options): the mixed op (KV-write, prefill and
    # decode kernels; gathered and page-slice prefill blocks) and the decode-only kernel.
    ([(1, 40), (9, 30), (1, 1), (17, 17)], (4, 2), 64, 8, dict(kv_block_size=16, decode=dict(num_splits=2))),
    ([(20, 70), (1, 33)], (9, 3), 64, 16, dict(kv_block_size=16, sliding_window=30)),
    ([(1, 100), (1, 37), (1, 16)], (4, 2), 64, 16, dict(decode_only=True, decode=dict(pages_per_iter=1), fused_merge=True)),
    ([(1, 64), (1, 65)], (2, 2), 128, 32, dict(decode_only=True, decode=dict(num_splits=1, pages_per_iter=1), rope=True)),
    # bf16 q/k/v: the dots run in float16 (`gpu_decode.dot_dtype`)
    ([(1, 40), (9, 30), (17, 17)], (4, 2), 64, 16, dict(kv_block_size=16, dtype=jnp.bfloat16, atol=3e-2)),
    ([(1, 100), (1, 37)], (4, 2), 64, 16, dict(decode_only=True, rope=True, dtype=jnp.bfloat16, atol=3e-2,
                                               decode=dict(pages_per_iter=1), fused_merge=True)),
]


@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("seqs,heads,head_dim,page_size,opts", FP8_CASES)
def test_interpret_fp8_cache_matches_reference(seqs, heads, head_dim, page_size, opts, kv_dtype):
    # The cache in FP8, q/k/v in float32: both ops store the same rounded (saturated) K/V and
    # attend to what is stored; the reference is checked against a float64 oracle with an FP8
    # cache in test_reference_attention.
    check_against_reference(seqs, interpret=True, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                            page_size=page_size, kv_dtype=kv_dtype, pad_tokens=2, pad_seqs=1, **opts)


def test_interpret_all_padding():
    # num_seqs == 0: every token is padding (NaN q/k/v); outputs are zeros, the cache untouched.
    rng = np.random.default_rng(7)
    config = dict(page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=F32)
    for decode_only in (False, True):
        args = ref_make_batch(rng, [], **config)
        got, got_kv = jax.jit(lambda *a: ragged_paged_attention_gpu(
            *a, sm_scale=0.125, q_block_size=4, decode_only=decode_only, interpret=True))(*args)
        want, want_kv = oracle(*args, sm_scale=0.125, sliding_window=None, soft_cap=None)
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(np.asarray(got), np.nan_to_num(want), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got_kv).view(np.uint32), want_kv.view(np.uint32))


@pytest.mark.parametrize("real_decode,real_prefill,decode_units,prefill_units",
                         [(256, 240, 256, 513), (0, 9, 16, 40), (12, 0, 16, 40), (5, 3, 8, 3), (1, 1, 1, 1)])
def test_attention_launch_visits_every_unit_once(real_decode, real_prefill, decode_units, prefill_units):
    # The one launch's unit order: every decode unit and every prefill block exactly once, the
    # real ones of both kinds before any spare one, mixed in proportion.
    from pallas_kernels.gpu import _unit_work

    u = jnp.arange(decode_units + prefill_units)
    is_prefill, index = (np.asarray(x) for x in _unit_work(u, real_decode, real_prefill, decode_units))
    assert sorted(index[~is_prefill]) == list(range(decode_units))
    assert sorted(index[is_prefill]) == list(range(prefill_units))
    real = real_decode + real_prefill
    assert (index[:real][is_prefill[:real]] < real_prefill).all() and (index[:real][~is_prefill[:real]] < real_decode).all()
    for n in range(1, real + 1):  # any prefix of the real units holds its share of prefill blocks, +-1
        assert abs(is_prefill[:n].sum() - n * real_prefill / real) <= 1


def test_bench_smoke():
    res = subprocess.run([sys.executable, "benchmarks/gpu_kernel_bench.py", "--smoke", "--interpret", "--mixed"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pallas" in res.stdout and "mixed" in res.stdout


GPU_SEQS = [
    [(1, 100), (1, 513), (1, 2000), (1, 1)],
    [(200, 200), (37, 300), (1, 64)],
    [(1, 33), (0, 40), (65, 65), (1, 900), (17, 129)],
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("seqs", GPU_SEQS)
@pytest.mark.parametrize("page_size,heads,head_dim", [(16, (32, 8), 128), (64, (9, 3), 64), (128, (16, 4), 128)])
def test_compiled_matches_reference(dtype, atol, seqs, page_size, heads, head_dim):
    check_against_reference(seqs, interpret=False, dtype=dtype, atol=atol, num_q_heads=heads[0], num_kv_heads=heads[1],
          head_dim=head_dim, page_size=page_size, q_block_size=16, kv_block_size=64, pad_tokens=5, pad_seqs=1)


@pytest.mark.parametrize("page_size,heads,head_dim,kw", [
    (16, (32, 8), 128, {}), (64, (9, 3), 64, dict(sliding_window=100)), (64, (32, 8), 128, dict(soft_cap=30.0)),
    (128, (16, 4), 128, {}), (32, (8, 2), 256, dict(decode_only=True)),
    (64, (32, 8), 128, dict(decode_only=True, rope=True)),
    (64, (32, 8), 128, dict(decode_only=True, rope=True, fused_merge=True)),
    (64, (32, 8), 128, dict(kv_dtype=jnp.float8_e4m3fn)),
    (64, (32, 8), 128, dict(decode_only=True, rope=True, fused_merge=True, kv_dtype=jnp.float8_e4m3fn))])
def test_compiled_kernels_lower_for_cuda_on_any_host(page_size, heads, head_dim, kw):
    # Pallas' Triton lowering runs when the program is lowered, on any host: the compiled
    # geometries lower for CUDA here, so a lowering error (session 12's first page-slice prefill
    # did not lower at page 64) fails on the CPU, before a GPU run.
    decode_only, rope = kw.pop("decode_only", False), kw.pop("rope", False)
    seqs = [(1, 100), (1, 513), (1, 64)] if decode_only else [(200, 200), (37, 300), (1, 64), (17, 129)]
    args = make_batch(seqs, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                      page_size=page_size, dtype=jnp.bfloat16, pad_tokens=3, pad_seqs=1)
    if "kv_dtype" in kw:  # an FP8 cache
        args = (*args[:3], args[3].astype(kw.pop("kv_dtype")), *args[4:])
    tables = tuple(jnp.ones((args[0].shape[0], head_dim), jnp.float32) for _ in "cs") if rope else None
    counts = jnp.zeros(args[0].shape[0] * heads[1], jnp.int32) if kw.pop("fused_merge", False) else None
    op = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, sm_scale=head_dim**-0.5, decode_only=decode_only,
                                                       rope=tables, counts=counts, **kw))
    text = op.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    if counts is not None:  # the merge's atomic and barriers are in the kernel
        assert "atomic_rmw" in text or "atom" in text.lower()
    kernels = ["decode_only"] if decode_only else ["kv_write", "attend"]
    assert all(f"ragged_paged_attention_gpu_{name}" in text for name in kernels)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("seqs,kw", [(GPU_SEQS[1], {}), (GPU_SEQS[2], dict(sliding_window=100)),
                                     ([(1, n) for n in (100, 513, 2000, 1, 64, 4096)], dict(decode_only=True, rope=True, fused_merge=True)),
                                     ([(1, 700)], dict(decode_only=True, rope=True, fused_merge=True))])
def test_compiled_fp8_cache_matches_reference(kv_dtype, seqs, kw):
    check_against_reference(seqs, interpret=False, dtype=jnp.bfloat16, atol=3e-2, num_q_heads=32, num_kv_heads=8,
                            head_dim=128, page_size=64, q_block_size=16, kv_block_size=64, pad_tokens=3, pad_seqs=1,
                            kv_dtype=kv_dtype, **kw)


# First chunks (q_len == kv_len) beside continuation chunks, decode rows and padding.
FIRST_CHUNK_SEQS = [
    [(200, 200), (37, 300), (1, 64), (65, 65)],
    [(2, 2), (17, 17), (1, 900), (64, 64), (300, 300), (1000, 1000), (17, 129)],
    [(37, 300), (1, 33), (17, 129)],  # no first chunk: cuDNN gets no segment
    [(1, 5), (900, 900)],
    [(3, 3), (1, 40)],  # with pad_seqs below: more sequence slots than tokens
]


@pytest.mark.gpu
@pytest.mark.parametrize("seqs", FIRST_CHUNK_SEQS)
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=100), dict(kv_dtype=jnp.float8_e4m3fn),
                                dict(num_q_heads=9, num_kv_heads=3, head_dim=64)])
def test_compiled_cudnn_first_chunks_match_reference(seqs, kw):
    from pallas_kernels import cudnn_prefill

    assert cudnn_prefill.available(), "cuDNN's packed attention should run on this GPU and jax"
    kw = {**dict(num_q_heads=32, num_kv_heads=8, head_dim=128), **kw}
    check_against_reference(seqs, interpret=False, dtype=jnp.bfloat16, atol=3e-2, page_size=64,
                            q_block_size=16, kv_block_size=64, pad_tokens=3,
                            pad_seqs=1 if len(seqs) > 2 else 12, prefill_impl="cudnn", **kw)


def packed_segments_oracle(q, k, v, starts, lens, *, sm_scale, sliding_window):
    """What `cudnn_prefill.packed_causal_attention` computes, in jnp: causal attention within
    each segment (token starts[i] .. starts[i] + lens[i], -1: no segment); rows outside zero."""
    t = jnp.arange(q.shape[0])
    inside = (t[:, None] >= starts[None, :]) & (t[:, None] < starts[None, :] + lens[None, :]) & (starts[None, :] >= 0)
    seg = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)  # [T]
    ok = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0) & (t[None, :] <= t[:, None])
    if sliding_window is not None:
        ok &= t[:, None] - t[None, :] < sliding_window
    group = q.shape[1] // k.shape[1]
    kk, vv = (jnp.repeat(x.astype(jnp.float32), group, axis=1) for x in (k, v))
    s = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), kk) * sm_scale
    p = jax.nn.softmax(jnp.where(ok[None], s, -jnp.inf), axis=-1)
    out = jnp.einsum("hts,shd->thd", jnp.where(ok[None], p, 0.0), vv)
    return jnp.where((seg >= 0)[:, None, None], out, 0.0).astype(q.dtype)


@pytest.mark.parametrize("seqs", FIRST_CHUNK_SEQS[:3] + FIRST_CHUNK_SEQS[4:])
@pytest.mark.parametrize("kw", [{}, dict(sliding_window=5), dict(kv_dtype=jnp.float8_e4m3fn)])
def test_interpret_first_chunks_split_between_paths(monkeypatch, seqs, kw):
    # The op's side of the cuDNN path on the CPU: which sequences are first chunks, the keys
    # rounded as an FP8 cache stores them, and the outputs put together, against the reference.
    # cuDNN's own call is replaced by a jnp oracle of what it computes (checked on the GPU by
    # test_compiled_cudnn_first_chunks_match_reference).
    from pallas_kernels import cudnn_prefill

    segments = []
    def oracle(q, k, v, starts, lens, **static):
        jax.debug.callback(lambda *a: segments.append(tuple(map(np.asarray, a))), starts, lens)
        return packed_segments_oracle(q, k, v, starts, lens, **static)

    monkeypatch.setattr(cudnn_prefill, "packed_causal_attention", oracle)
    seqs = [(min(ql, 40), min(ql, 40) if ql == kl else kl) for ql, kl in seqs]  # interpret-mode sizes
    check_against_reference(seqs, interpret=True, dtype=jnp.bfloat16, atol=3e-2, num_q_heads=4, num_kv_heads=2,
                            head_dim=32, page_size=16, q_block_size=4, kv_block_size=16, pad_tokens=3,
                            pad_seqs=1 if len(seqs) > 2 else 12, prefill_impl="cudnn", **kw)
    starts, lens = segments[0]  # one slot per first chunk, in order, then unused slots (-1)
    cu = np.cumsum([0] + [ql for ql, _ in seqs])
    first = [i for i, (ql, kl) in enumerate(seqs) if ql > 1 and ql == kl]
    n = len(first)
    assert starts[:n].tolist() == cu[first].tolist() and lens[:n].tolist() == [seqs[i][0] for i in first]
    assert (starts[n:] == -1).all() and (lens[n:] == -1).all()


def test_prefill_impl_is_checked():
    args = make_batch([(3, 3)], num_q_heads=2, num_kv_heads=1, head_dim=16, page_size=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="prefill_impl"):
        ragged_paged_attention_gpu(*args, sm_scale=0.25, prefill_impl="flash", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(sliding_window=100), dict(soft_cap=30.0), dict(head_dim=256, page_size=32),
                                dict(decode=dict(num_splits=5, pages_per_iter=2), seqs=GPU_SEQS[0])])
def test_compiled_options(kw):
    kw = {"seqs": GPU_SEQS[2], "head_dim": 128, "page_size": 16, **kw}
    check_against_reference(interpret=False, dtype=jnp.bfloat16, atol=3e-2, num_q_heads=32, num_kv_heads=8,
                            q_block_size=16, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-3), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("page_size,heads,head_dim,kw", [
    (16, (32, 8), 128, {}), (64, (9, 3), 64, dict(sliding_window=100)), (128, (16, 4), 128, dict(soft_cap=30.0)),
    (64, (32, 8), 128, dict(decode=dict(num_splits=1))), (64, (32, 8), 128, dict(rope=True)),
    (16, (9, 3), 64, dict(rope=True, decode=dict(num_splits=1)))])
@pytest.mark.parametrize("fused_merge", [False, True], ids=["xla_merge", "fused_merge"])
def test_compiled_decode_only_matches_reference(dtype, atol, page_size, heads, head_dim, kw, fused_merge):
    seqs = [(1, n) for n in (100, 513, 2000, 1, 64, 4096)]
    check_against_reference(seqs, interpret=False, dtype=dtype, atol=atol, num_q_heads=heads[0],
                            num_kv_heads=heads[1], head_dim=head_dim, page_size=page_size, pad_tokens=3,
                            pad_seqs=2, decode_only=True, fused_merge=fused_merge, **kw)

