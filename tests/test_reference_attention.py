"""The pure-jnp ragged paged attention against a dense float64 numpy oracle.

Batches are ragged (decode, prefill, chunked prefill continuing a cached sequence, q_len 0,
padding tokens and sequences), page tables are random permutations, and every cache slot that
holds no real data is NaN, so a wrong page, a missing length mask or unzeroed V shows up.
"""

import math
import zlib

import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference
from pallas_kernels.reference import ragged_paged_attention_reference_jit

F32 = np.float32
BF16 = ml_dtypes.bfloat16


def make_batch(rng, seqs, *, page_size, num_q_heads, num_kv_heads, head_dim, dtype, pad_tokens=5, pad_seqs=2, shape=None):
    """Random inputs for `seqs` = [(q_len, kv_len), ...] plus padding tokens and sequences.

    Only slots holding cached tokens (positions < kv_len - q_len) carry data; every other slot,
    including those this step will write, is NaN, as are padding tokens' q/k/v. `shape` =
    (num_tokens, num_seqs_max, pages_per_seq, num_pages) pads to a fixed bucket (as the engine
    does) so several batches share one compilation.
    """
    num_real = len(seqs)
    owned = [math.ceil(kv / page_size) for _, kv in seqs]
    num_tokens = sum(q for q, _ in seqs) + pad_tokens
    num_seqs_max = num_real + pad_seqs
    pages_per_seq = max(owned, default=0) + 1  # one spare slot holding a garbage page id
    num_pages = sum(owned) + 3  # a few pages nobody owns
    if shape is not None:
        assert shape[0] >= num_tokens and shape[1] >= num_seqs_max and shape[2] >= pages_per_seq and shape[3] >= num_pages
        num_tokens, num_seqs_max, pages_per_seq, num_pages = shape
    pad_tokens = num_tokens - sum(q for q, _ in seqs)
    perm = rng.permutation(num_pages)

    page_indices = rng.integers(0, num_pages, (num_seqs_max, pages_per_seq)).astype(np.int32)
    page_indices[num_real:, ::2] = -1  # padding rows: garbage including invalid ids
    kv_lens = rng.integers(0, 1000, num_seqs_max).astype(np.int32)  # padding rows: garbage
    cu_q_lens = np.full(num_seqs_max + 1, num_tokens - pad_tokens, np.int32)
    cu_q_lens[: num_real + 1] = np.cumsum([0] + [q for q, _ in seqs])
    cache = np.full(get_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim), np.nan, dtype)
    taken = 0
    for i, (q_len, kv_len) in enumerate(seqs):
        page_indices[i, : owned[i]] = perm[taken : taken + owned[i]]
        taken += owned[i]
        kv_lens[i] = kv_len
        for p in range(kv_len - q_len):
            cache[page_indices[i, p // page_size], p % page_size] = rng.standard_normal((2 * num_kv_heads, head_dim))

    def tokens(num_heads):
        x = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(dtype)
        x[num_tokens - pad_tokens :] = np.nan
        return x

    q, k, v = tokens(num_q_heads), tokens(num_kv_heads), tokens(num_kv_heads)
    return q, k, v, cache, kv_lens, page_indices, cu_q_lens, np.array([num_real], np.int32)


def oracle(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window, soft_cap):
    """Dense per-sequence causal attention in float64, plus the expected cache after the writes."""
    page_size = kv_pages.shape[1]
    group = q.shape[1] // k.shape[1]
    new_pages = kv_pages.copy()
    out = np.zeros(q.shape, np.float64)
    for i in range(int(num_seqs[0])):
        lo, hi, kv_len = int(cu_q_lens[i]), int(cu_q_lens[i + 1]), int(kv_lens[i])
        start = kv_len - (hi - lo)
        keys = np.zeros((kv_len, k.shape[1], k.shape[2]), np.float64)
        vals = np.zeros_like(keys)
        for p in range(kv_len):
            page, off = page_indices[i, p // page_size], p % page_size
            if p < start:  # cached: read the initial cache
                keys[p], vals[p] = kv_pages[page, off, 0::2], kv_pages[page, off, 1::2]
            else:  # new: take the token's k/v and record the expected write
                t = lo + p - start
                keys[p], vals[p] = k[t], v[t]
                new_pages[page, off, 0::2], new_pages[page, off, 1::2] = k[t], v[t]
        for t in range(lo, hi):
            pos = start + t - lo
            for h in range(q.shape[1]):
                s = keys[: pos + 1, h // group] @ q[t, h].astype(np.float64) * sm_scale  # [pos+1]
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                if sliding_window is not None:
                    s = np.where(pos - np.arange(pos + 1) < sliding_window, s, -np.inf)
                w = np.exp(s - s.max())
                out[t, h] = (w / w.sum()) @ vals[: pos + 1, h // group]
    return out, new_pages


def scenario(name, p):
    """(q_len, kv_len) lists for page size p, hitting page boundaries exactly and one over."""
    return {
        "decode": [(1, 1), (1, p), (1, p + 1), (1, 3 * p + 5), (1, 2 * p - 1), (1, 2 * p)],
        "prefill": [(p, p), (p + 1, p + 1), (5, 5), (2 * p + 3, 2 * p + 3), (1, 1)],
        # Chunked prefill continuing cached sequences, a q_len 0 sequence, decode rows.
        "mixed": [(1, 2 * p + 1), (p + 3, 2 * p + 7), (0, p), (1, 1), (2 * p, 2 * p), (17, 3 * p), (p, 2 * p)],
    }[name]


# page_size, head_dim, num_q_heads, num_kv_heads, sliding_window, soft_cap, kv_chunk_size, q_block_size, dtype
CONFIGS = [
    (16, 64, 4, 4, None, None, 128, 16, F32),  # MHA, one chunk covers most sequences
    (8, 64, 9, 3, None, None, 16, 16, F32),  # GQA 3, many loop iterations
    (32, 128, 8, 2, None, None, 32, 8, F32),  # GQA 4, head_dim 128, chunk == one page
    (16, 64, 8, 8, 20, None, 32, 16, F32),  # sliding window
    (8, 128, 4, 1, None, 2.0, 8, 4, F32),  # soft cap (small enough to bite), MQA
    (16, 64, 9, 3, 13, 3.0, 40, 16, F32),  # both; chunk 40 rounds up to 3 pages
    (16, 64, 8, 2, None, None, 64, 16, BF16),
    (8, 128, 9, 3, 10, 2.5, 16, 8, BF16),
]


def check_against_oracle(rng, seqs, config, **batch_kwargs):
    page_size, head_dim, hq, hkv, window, cap, chunk, bq, dtype = config
    args = make_batch(
        rng, seqs, page_size=page_size, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim, dtype=dtype, **batch_kwargs
    )
    q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = args
    opts = dict(sm_scale=head_dim**-0.5, sliding_window=window, soft_cap=cap)
    out, new_pages = ragged_paged_attention_reference_jit(*args, kv_chunk_size=chunk, q_block_size=bq, **opts)
    out, new_pages = np.asarray(out), np.asarray(new_pages)
    want_out, want_pages = oracle(*args, **opts)

    assert out.dtype == dtype and out.shape == q.shape
    assert np.isfinite(out.astype(np.float32)).all()
    num_real_tokens = cu_q_lens[num_seqs[0]]
    tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(out[:num_real_tokens].astype(np.float64), want_out[:num_real_tokens], atol=tol, rtol=tol)
    # Bitwise: written slots hold exactly the new k/v, every other slot (NaN included) is untouched.
    uint = np.uint32 if dtype == F32 else np.uint16
    assert new_pages.dtype == dtype
    np.testing.assert_array_equal(new_pages.view(uint), want_pages.view(uint))
    return out


def config_id(c):
    return f"ps{c[0]}-d{c[1]}-h{c[2]}x{c[3]}-w{c[4]}-cap{c[5]}-c{c[6]}-q{c[7]}-{np.dtype(c[8]).name}"


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("name", ["decode", "prefill", "mixed"])
def test_matches_oracle(name, config):
    rng = np.random.default_rng(zlib.crc32(repr((name, config[:8])).encode()))
    seqs = scenario(name, config[0])
    rng.shuffle(seqs)
    # One bucket for all three scenarios: one compilation per config.
    check_against_oracle(rng, seqs, config, shape=(160, 10, 6, 20))


def test_random_ragged_batches():
    config = (8, 64, 6, 2, None, None, 24, 4, F32)
    rng = np.random.default_rng(0)
    for _ in range(6):
        seqs = []
        for _ in range(rng.integers(1, 7)):
            kv_len = int(rng.integers(1, 60))
            seqs.append((int(rng.integers(0, kv_len + 1)), kv_len))
        check_against_oracle(rng, seqs, config, pad_tokens=0, shape=(360, 8, 9, 56))


def test_no_padding_and_all_padding():
    config = (8, 64, 4, 2, None, None, 16, 16, F32)
    rng = np.random.default_rng(1)
    check_against_oracle(rng, [(3, 10), (1, 9)], config, pad_tokens=0, pad_seqs=0)
    # num_seqs == 0: every token is padding; outputs are zeros and the cache is untouched.
    out = check_against_oracle(rng, [], config, pad_tokens=4, pad_seqs=2)
    assert not out.any()


def test_plain_function_traces_under_caller_jit():
    import jax

    rng = np.random.default_rng(2)
    args = make_batch(rng, [(4, 20), (1, 33)], page_size=16, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=F32)
    opts = dict(sm_scale=0.125, sliding_window=7, soft_cap=5.0)
    out, pages = jax.jit(lambda *a: ragged_paged_attention_reference(*a, kv_chunk_size=32, **opts))(*args)
    want_out, want_pages = oracle(*args, **opts)
    np.testing.assert_allclose(np.asarray(out)[:5], want_out[:5], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(pages).view(np.uint32), want_pages.view(np.uint32))


def test_cache_shape_and_validation():
    assert get_kv_cache_shape(10, 16, 4, 128) == (10, 16, 8, 128)
    rng = np.random.default_rng(3)
    q, k, v, pages, kv_lens, page_indices, cu, n = make_batch(
        rng, [(2, 5)], page_size=8, num_q_heads=6, num_kv_heads=2, head_dim=64, dtype=F32
    )
    with pytest.raises(ValueError, match="multiple"):
        ragged_paged_attention_reference(q[:, :5], k, v, pages, kv_lens, page_indices, cu, n, sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_pages"):
        ragged_paged_attention_reference(q, k, v, pages[..., :32], kv_lens, page_indices, cu, n, sm_scale=1.0)


@pytest.mark.parametrize("kv_dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2], ids=lambda d: np.dtype(d).name)
def test_fp8_cache_matches_oracle(kv_dtype):
    # An FP8 cache (kv_cache_dtype="fp8"): new K/V are stored rounded, saturating at the format's
    # largest finite value, and attention reads what is stored. The oracle gets the rounded
    # values (ml_dtypes' conversion, independent of jnp's) and the float32 cache they came from.
    config = (16, 64, 8, 2, None, None, 32, 8, F32)
    rng = np.random.default_rng(4)
    q, k, v, pages, kv_lens, page_indices, cu, n = make_batch(
        rng, scenario("mixed", 16), page_size=16, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=F32)
    k[0, 0, :4] = [1e5, -1e5, 470.0, -300.0]  # past the largest value of both formats, and in e5m2 only
    limit = float(ml_dtypes.finfo(kv_dtype).max)
    stored = lambda x: np.clip(x, -limit, limit).astype(kv_dtype)
    pages = pages.astype(kv_dtype)  # NaN where no data, as in the engine's recycled pages
    opts = dict(sm_scale=0.125, sliding_window=None, soft_cap=None)
    out, new_pages = ragged_paged_attention_reference_jit(q, k, v, pages, kv_lens, page_indices, cu, n,
                                                          kv_chunk_size=32, q_block_size=8, **opts)
    want_out, want_pages = oracle(q, stored(k).astype(F32), stored(v).astype(F32), pages.astype(F32),
                                  kv_lens, page_indices, cu, n, **opts)
    assert np.asarray(new_pages).dtype == kv_dtype
    num_real = cu[n[0]]
    np.testing.assert_allclose(np.asarray(out)[:num_real], want_out[:num_real], atol=1e-5, rtol=1e-5)
    # Value for value (NaN where NaN: e5m2 has several NaN encodings, which round trips change).
    np.testing.assert_array_equal(np.asarray(new_pages).astype(F32), want_pages.astype(kv_dtype).astype(F32))
    pos = kv_lens[0] - (cu[1] - cu[0])  # token 0 is sequence 0's first query
    written = np.asarray(new_pages)[page_indices[0, pos // 16], pos % 16, 0, :2].astype(F32)
    assert written.tolist() == [limit, -limit]  # saturated, not NaN or inf
