"""The TPU (Mosaic) Pallas kernel against the pure-jnp oracle, in Pallas' TPU interpret mode on CPU.

No TPU is lent here, so everything runs interpreted: shapes are tiny, and each case runs several
batches through one compile. The interpreter fills VMEM scratch with NaN, so buffer parts the
kernel never fetches are NaN too, on top of the NaN the tests put in unused cache positions.
A few cases also run the interpreter's happens-before race detector over the kernel's DMAs (KV
writes vs page reads); one more checks that Pallas lowers the kernel to the Mosaic dialect.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference

pltpu = pytest.importorskip("jax.experimental.pallas.tpu", reason="this jax has no Pallas TPU module")
if not hasattr(pltpu, "InterpretParams"):
    pytest.skip("this jax's Pallas TPU module has no InterpretParams (TPU interpret mode)", allow_module_level=True)
try:
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret
except ImportError:  # the race detector's state moved: race cases are skipped, the rest still run
    tpu_interpret = None

from pallas_kernels.tpu import SMEM_TABLE_LIMIT_BYTES, ragged_paged_attention_tpu  # noqa: E402


def make_batches(seq_lists, *, num_q_heads, num_kv_heads, head_dim, page_size, dtype, pad_tokens=0, pad_seqs=0,
                 seed=0):
    """One argument tuple per list of (q_len, kv_len), all with the same shapes (so one compile
    serves them all). Cache positions outside every sequence's length hold NaN."""
    rng = np.random.default_rng(seed)
    num_tokens = max(sum(ql for ql, _ in seqs) for seqs in seq_lists) + pad_tokens
    num_seqs_max = max(len(seqs) for seqs in seq_lists) + pad_seqs
    pages_per_seq = max(-(-kl // page_size) for seqs in seq_lists for _, kl in seqs) + 1
    num_pages = num_seqs_max * pages_per_seq + 2
    r = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    batches = []
    for seqs in seq_lists:
        page_indices = rng.permutation(num_pages)[: num_seqs_max * pages_per_seq].reshape(num_seqs_max, pages_per_seq)
        kv = rng.standard_normal(get_kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim))
        used = np.zeros(kv.shape[:2], bool)  # [page, slot] inside some sequence's length
        for i, (_, kl) in enumerate(seqs):
            for p in range(kl):
                used[page_indices[i, p // page_size], p % page_size] = True
        kv[~used] = np.nan
        # Padding sequences carry garbage lengths: num_seqs must be what hides them.
        q_lens = [ql for ql, _ in seqs] + [3] * (num_seqs_max - len(seqs))
        kv_lens = [kl for _, kl in seqs] + [7] * (num_seqs_max - len(seqs))
        batches.append((r(num_tokens, num_q_heads, head_dim), r(num_tokens, num_kv_heads, head_dim),
                        r(num_tokens, num_kv_heads, head_dim), jnp.asarray(kv, dtype), jnp.asarray(kv_lens, jnp.int32),
                        jnp.asarray(page_indices, jnp.int32),
                        jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32),
                        jnp.asarray([len(seqs)], jnp.int32)))
    return batches


def check_against_reference(seq_lists, *, dtype=jnp.float32, num_q_heads=4, num_kv_heads=1, head_dim=64,
                            page_size=16, atol=1e-4, pad_tokens=0, pad_seqs=0, interpret=True, kv_dtype=None, **kw):
    """kv_dtype: the cache's dtype when it differs from q/k/v's (an FP8 cache)."""
    batches = make_batches(seq_lists, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           page_size=page_size, dtype=dtype, pad_tokens=pad_tokens, pad_seqs=pad_seqs)
    if kv_dtype is not None:  # one new key past e4m3's largest value: saturated by both ops
        batches = [(q, k.at[0, 0, :2].set(jnp.asarray([1e5, -1e5], dtype)), v, kv.astype(kv_dtype), *rest)
                   for q, k, v, kv, *rest in batches]
    static = dict(sm_scale=head_dim**-0.5, sliding_window=kw.pop("sliding_window", None),
                  soft_cap=kw.pop("soft_cap", None))
    reference = jax.jit(lambda *a: ragged_paged_attention_reference(*a, **static))
    # kv_pages donated, as the engine does: the in-kernel writes then update it in place.
    kernel = jax.jit(lambda *a: ragged_paged_attention_tpu(*a, interpret=interpret, **static, **kw), donate_argnums=3)
    for seqs, args in zip(seq_lists, batches):
        want, want_kv = reference(*args)
        got, got_kv = kernel(*args)
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all(), seqs
        np.testing.assert_allclose(got, want, atol=atol, rtol=atol, err_msg=str(seqs))
        # Owned pages hold the new K/V exactly; every other position (NaN included) is untouched.
        got_kv, want_kv = np.asarray(got_kv, np.float32), np.asarray(want_kv, np.float32)
        np.testing.assert_array_equal(got_kv, want_kv, err_msg=str(seqs))


def case_id(case):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in case.items() if k != "seqs") or "default"


# (q_len, kv_len) lists. page_size 16 unless the case says otherwise.
DECODE = [(1, 5), (1, 16), (1, 17), (1, 1), (1, 33)]  # at / across page boundaries
DECODE_2 = [(1, 48), (1, 2), (1, 31)]
PREFILL = [(16, 16), (9, 20), (17, 40), (2, 2)]  # whole pages, chunks that continue a sequence
MIXED = [(1, 12), (0, 9), (6, 6), (1, 32), (5, 19), (16, 48)]  # with an empty query
EMPTY = [(0, 5), (0, 9)]  # nothing to compute: every row is padding

CASES = [
    dict(seqs=[DECODE, DECODE_2], batch_kind="decode", pad_tokens=2, pad_seqs=1, decode_pages_per_kv_block=1),
    dict(seqs=[DECODE, PREFILL, MIXED, EMPTY], pad_tokens=3, pad_seqs=2, q_block_size=4, pages_per_kv_block=2,
         decode_pages_per_kv_block=2),
    dict(seqs=[PREFILL, MIXED], batch_kind="prefill", q_block_size=8, pages_per_kv_block=1),  # decodes as 1-row blocks
    dict(seqs=[MIXED, PREFILL], num_q_heads=6, num_kv_heads=2, head_dim=128, page_size=32, q_block_size=8),  # GQA 3
    dict(seqs=[MIXED], num_q_heads=2, num_kv_heads=2, page_size=64, q_block_size=16),  # GQA 1
    dict(seqs=[MIXED], num_q_heads=8, num_kv_heads=2, pad_tokens=1),  # GQA 4, default block sizes
    dict(seqs=[MIXED, DECODE], sliding_window=5, q_block_size=4, pages_per_kv_block=1, decode_pages_per_kv_block=1),
    dict(seqs=[PREFILL + [(1, 50)]], sliding_window=20, soft_cap=5.0, q_block_size=4, pages_per_kv_block=1),
    dict(seqs=[MIXED], batch_kind="prefill", soft_cap=2.0, sliding_window=9, page_size=32, q_block_size=8,
         pages_per_kv_block=1),
    dict(seqs=[[(1, 7), (3, 10)]], head_dim=256, num_q_heads=2, num_kv_heads=1, q_block_size=4),
    dict(seqs=[MIXED], dtype=jnp.bfloat16, atol=2e-2, num_q_heads=4, num_kv_heads=2, q_block_size=8,
         pages_per_kv_block=2),
    dict(seqs=[MIXED, DECODE], kv_dtype=jnp.float8_e4m3fn, num_q_heads=4, num_kv_heads=2, q_block_size=4,
         pages_per_kv_block=2),  # an FP8 cache
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpret_matches_reference(case):
    case = dict(case)
    check_against_reference(case.pop("seqs"), **case)


@pytest.mark.skipif(tpu_interpret is None, reason="the TPU interpreter's race-detector state is not importable")
def test_no_races():
    """Several blocks of one sequence (each writing its tokens, then reading pages that hold them),
    decodes, a window, double-buffered chunks: the happens-before detector must stay silent. On 2
    simulated cores the decode call's "parallel" grid is split between them in random order; the
    prefill grid is "arbitrary", so it runs in order on one core (marking it "parallel" makes this
    test report races)."""
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    check_against_reference([[(1, 12), (6, 6), (9, 19), (1, 3), (1, 9)]], page_size=8, q_block_size=4,
                            pages_per_kv_block=1, decode_pages_per_kv_block=2, sliding_window=10, pad_tokens=1,
                            interpret=params)
    assert tpu_interpret.races is not None  # the detector ran
    assert not tpu_interpret.races.races_found


def test_page_table_too_large_for_smem():
    num_seqs_max, pages_per_seq, page_size = 256, 1024, 16  # 1 MiB of page table
    shape = lambda *s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)
    args = (shape(8, 4, 64), shape(8, 1, 64), shape(8, 1, 64), shape(64, page_size, 2, 64),
            shape(num_seqs_max, dt=jnp.int32), shape(num_seqs_max, pages_per_seq, dt=jnp.int32),
            shape(num_seqs_max + 1, dt=jnp.int32), shape(1, dt=jnp.int32))
    assert num_seqs_max * pages_per_seq * 4 > SMEM_TABLE_LIMIT_BYTES
    with pytest.raises(ValueError, match=r"use page_size >= 32\b"):
        jax.eval_shape(lambda *a: ragged_paged_attention_tpu(*a, sm_scale=1.0, interpret=True), *args)


def test_bad_batch_kind():
    [args] = make_batches([[(1, 3)]], num_q_heads=2, num_kv_heads=1, head_dim=64, page_size=16, dtype=jnp.float32)
    with pytest.raises(ValueError, match="batch_kind"):
        ragged_paged_attention_tpu(*args, sm_scale=1.0, batch_kind="chunked", interpret=True)


@pytest.mark.parametrize("dtype,head_dim,page_size,heads,kv_dtype",
                         [(jnp.bfloat16, 128, 16, (32, 8), None), (jnp.float32, 64, 32, (12, 4), None),
                          (jnp.bfloat16, 128, 16, (32, 8), jnp.float8_e4m3fn)])
def test_lowers_to_mosaic(monkeypatch, dtype, head_dim, page_size, heads, kv_dtype):
    """Pallas' Mosaic lowering (Python side, no libtpu) accepts every op of the kernel. The lowering
    asks which TPU it targets; on CPU we tell it a v5e. Mosaic's own compile needs a TPU."""
    try:
        from jax._src.pallas.mosaic import tpu_info
        info = tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"this jax has no TPU chip table to lower against: {e}")
    monkeypatch.setattr(tpu_info, "get_tpu_info", lambda: info)
    [args] = make_batches([[(1, 40), (20, 60), (7, 7)]], num_q_heads=heads[0], num_kv_heads=heads[1],
                          head_dim=head_dim, page_size=page_size, dtype=dtype, pad_tokens=4, pad_seqs=1)
    if kv_dtype is not None:
        args = (*args[:3], args[3].astype(kv_dtype), *args[4:])
    op = lambda *a: ragged_paged_attention_tpu(*a, sm_scale=0.1, sliding_window=16, soft_cap=30.0, q_block_size=8)
    text = jax.jit(op).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= 2  # the decode call and the prefill call
