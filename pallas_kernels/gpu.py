"""Ragged paged attention for NVIDIA GPUs: Pallas kernels lowered through Pallas' Triton backend.

Same contract and cache layout as `pallas_kernels.reference.ragged_paged_attention_reference`:
one call serves a ragged batch of T query rows (decodes, prefill chunks, padding), first writing
the new K/V of every real token into its page, then attending causally over each sequence's pages.

Two launches per call:
- KV write: one program per (token, kv head) stores the token's K and V rows into its page. The
  cache is aliased input -> output (`input_output_aliases`), so under a donating jit it is
  updated in place; padding tokens store nothing.
- Attention: one grid (units, kv heads) for every query row. A unit is a prefill block or a
  decode (slot, split); the real units of both kinds are interleaved in proportion
  (`_unit_work`), so each SM's resident programs mix bandwidth-bound decode work with
  matmul-bound prefill work instead of running the two as separate launches one after the other.
  On the H100, an offline step's op (256 decodes at ctx 1088 + 2 x 1024 first chunks in 4096
  tokens) went from 0.641 to 0.571 ms and the offline run from 3,606 to 3,659 output tok/s in
  the same lease (benchmarks/results/h100_session22.md).
  - Decode (`gpu_decode.decode_slot`): sequences with one query token, split-KV
    (flash-decoding). With one split a program stores its rows straight into the output; with
    several, float32 partials merged after the launch.
  - Prefill (`_prefill_block`): sequences with several query tokens, cut into blocks of
    `q_block_size` rows of ONE sequence. The block's rows for the kv head's group of q heads are
    folded into the M dimension (M = q_block_size * group_pad, token-major), with the group padded
    to a power of two (SmolLM2's group of 3 becomes 4: the extra row is computed and dropped). Each
    program loops over KV blocks of `kv_block_size` keys (default 64) up to its causal limit,
    starting at the sliding window. A block's keys are one [keys, D] tile, so each step is one pair
    of dots whatever the page size: a slice of one page where pages hold whole blocks (page 64,
    the GPU default), else gathered row by row from their pages (on the H100 the gathered tile
    made prefill 1.2-1.4x faster than a step per 16-key page). Blocks before the query block's
    first position skip the causal mask. On the H200 at page 64, the page slice and the unmasked
    blocks together made the op 1.08x (8 x 512) to 1.21x (1 x 2048) faster; it is still ~2x slower
    than cuDNN's dense fused attention (benchmarks/results/h200_session12.md). Padding blocks have
    0 rows and no KV work.
Both kinds of program read q where the projection left it, as rows [T * Hq, D] (a free
reshape; token t's q head j is row t * Hq + j, so a kv head's group is `group` adjacent rows),
gathering each tile's rows with clamped indices: q is never copied into another layout. They
store their output rows the same way, so the op's output needs no relayout either
(the relayouts of q and of the output around the kernels took ~3.6 ms of a 205 ms 8B mixed step
on the H200; without them the H100's offline run was 3,683 output tok/s against 3,616-3,639
before, within the spread of single runs: benchmarks/results/h100_session21.md). Outputs are stored with row masks, so a block's spare rows never clobber another
sequence's tokens. Scores beyond the causal limit are masked with
`jnp.where` and V beyond the length is zeroed, so NaN in recycled pages never reaches an output.

Compiled (Triton) needs power-of-two block dims (page_size >= 16, head_dim); dots fall back to a
broadcast-multiply-sum when a prefill tile dim is below 16. In interpret mode (CPU) any size runs.
On the H100 (benchmarks/results/gpu_kernel_bench_h100.md, before the one-launch change) this
mixed op's decode reached 89-103% of the copy bandwidth for batch x context >= 32 x 8k / 128 x 2k;
smaller ops paid ~40 us of fixed work around the decode kernel (KV-write and empty prefill
launches, layout fusions). Batches where
every sequence decodes can take `decode_only=True` instead (the engine does): one launch, 83-102%
for batch >= 32 at ctx >= 2k.

`decode_impl` picks the decode kernel: "pallas" (`gpu_decode.py`, the default) or "triton"
(`triton_decode.py`: official Triton through jax_triton, reading the raw metadata and writing the
output rows in place, split merge fused into the same launch); the attention launch then holds
the prefill blocks alone. "pallas" stays the default until the H100 numbers of both are in.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import cudnn_prefill
from pallas_kernels.gpu_decode import (_next_pow2, decode_only_attention, decode_rows, decode_slot, dot_dtype,
                                      merge_splits, q_row)
from pallas_kernels.gpu_splits import NUM_SMS, num_splits_for, split_count, wave_size
from pallas_kernels.reference import _token_layout, _validate, to_cache_dtype


def compiled_supports(page_size: int, head_dim: int) -> bool:
    """Whether the compiled (Triton) kernel takes this cache geometry."""
    return page_size >= 16 and page_size == _next_pow2(page_size) and head_dim == _next_pow2(head_dim)


def _validate_blocks(q, kv_pages, q_block_size, kv_block_size, interpret) -> None:
    if q_block_size < 1 or kv_block_size < 1:
        raise ValueError(f"q_block_size={q_block_size} and kv_block_size={kv_block_size} must be >= 1")
    if interpret:
        return
    page_size, head_dim = kv_pages.shape[1], q.shape[2]
    dims = dict(q_block_size=q_block_size, kv_block_size=kv_block_size, page_size=page_size,
                head_dim=head_dim)
    bad = {name: n for name, n in dims.items() if n != _next_pow2(n)}
    if bad or kv_block_size < 16 or not compiled_supports(page_size, head_dim):
        raise ValueError(f"the Triton lowering needs power-of-two block dims, page_size and "
                         f"kv_block_size >= 16, got {dims}")


def _prefill_stages(kv_block_size: int, head_dim: int, itemsize: int) -> int:
    """Pipelining depth of the prefill kernel's K/V loads within the H100's shared memory: 3 for
    bf16 at head_dim 128 (3 beat 1 by ~4% there), fewer for wider tiles."""
    stage_bytes = 2 * kv_block_size * head_dim * itemsize
    return 3 if stage_bytes <= 32 << 10 else 2 if stage_bytes <= 64 << 10 else 1


# ---- KV write -------------------------------------------------------------------------------

def _write_kernel(dest_ref, k_ref, v_ref, kv_in_ref, kv_ref):
    del kv_in_ref  # the same buffer as kv_ref (aliased)
    t, h = pl.program_id(0), pl.program_id(1)
    page, row = dest_ref[t, 0], dest_ref[t, 1]

    @pl.when(page >= 0)
    def _():
        kv_ref[page, row, 2 * h, :] = to_cache_dtype(k_ref[t, h, :], kv_ref.dtype)
        kv_ref[page, row, 2 * h + 1, :] = to_cache_dtype(v_ref[t, h, :], kv_ref.dtype)


def _write_new_kv(kv_pages, k, v, page_indices, tok_seq, tok_pos, tok_valid, interpret):
    page_size = kv_pages.shape[1]
    pages_per_seq = page_indices.shape[1]
    slot = jnp.clip(tok_pos // page_size, 0, pages_per_seq - 1)  # [T]
    page = jnp.where(tok_valid, page_indices[tok_seq, slot], -1)  # [T] -1: padding, no write
    dest = jnp.stack([page, tok_pos % page_size], axis=1).astype(jnp.int32)  # [T, 2]
    whole = pl.BlockSpec()
    return pl.pallas_call(
        _write_kernel,
        grid=(k.shape[0], k.shape[1]),
        in_specs=[whole, whole, whole, whole],
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        input_output_aliases={3: 0},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="ragged_paged_attention_gpu_kv_write",
    )(dest, k, v, kv_pages)


# ---- prefill --------------------------------------------------------------------------------

def _mm(a, b, *, trans_b: bool, exact: bool):
    """a [M, K] @ b ([N, K] if trans_b else [K, N]) -> [M, N] float32."""
    if min(a.shape + b.shape) >= 16:
        return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=not exact)
    b = b if trans_b else b.T  # [N, K]
    return jnp.sum(a[:, None, :].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=-1)


def _prefill_metadata(cu, q_lens, kv_lens, is_prefill, num_seqs, num_tokens, bq, num_blocks):
    """Per query block: (seq, first token, rows, first row's position, kv_len). The blocks of the
    prefill sequences (`is_prefill` [S]) come first; then zero blocks, whose rows (kv_len 0) are
    the padding tokens past the last real one, bq at a time, stored as zeros; the rest have 0
    rows. num_blocks must hold both: the grid's ceil(T / bq) + min(S, T // 2) + 1 does, since
    each prefill sequence has >= 2 tokens and wastes at most one partial block."""
    num_seqs_max = kv_lens.shape[0]
    blocks = jnp.where(is_prefill, -(-q_lens // bq), 0)  # [S]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks).astype(jnp.int32)])  # [S+1]
    b = jnp.arange(num_blocks, dtype=jnp.int32)  # [NB]
    seq = jnp.clip(jnp.searchsorted(cu_blocks, b, side="right", method="compare_all") - 1, 0, num_seqs_max - 1)  # [NB]
    first = (b - cu_blocks[seq]) * bq  # [NB] first row among the sequence's queries
    in_seq = b < cu_blocks[-1]
    rows = jnp.where(in_seq, jnp.clip(q_lens[seq] - first, 0, bq), 0)  # [NB]
    pad_start = cu[num_seqs[0]] + (b - cu_blocks[-1]) * bq  # [NB] zero blocks: their first padding token
    pad_rows = jnp.where(in_seq, 0, jnp.clip(num_tokens - pad_start, 0, bq))  # [NB]
    start = jnp.where(rows > 0, cu[seq] + first, jnp.where(pad_rows > 0, pad_start, 0))  # [NB]
    pos0 = kv_lens[seq] - q_lens[seq] + first  # [NB]
    meta = jnp.stack([seq, start, rows + pad_rows, pos0, jnp.where(rows > 0, kv_lens[seq], 0)], axis=1)  # [NB, 5]
    return meta.astype(jnp.int32)


def _store_rows(o_ref, rows, out, keep, sink):
    """Stores out [M, D] at rows `rows` [M] of o_ref, where `keep` [M]. sink: None (compiled:
    masked rows are not stored, so any in-bounds row will do), or the first of M spare rows past
    the output's end that the masked rows are pointed at (interpret mode needs that no two rows
    of a store share an address, and masks only array indices)."""
    if sink is not None:
        rows = jnp.where(keep, rows, sink + lax.broadcasted_iota(jnp.int32, rows.shape, 0))
    cols = lax.broadcasted_iota(jnp.int32, (1, out.shape[1]), 1)
    plgpu.store(o_ref.at[rows[:, None], cols], out.astype(o_ref.dtype),
                mask=jnp.broadcast_to(keep[:, None], out.shape))


def _prefill_block(meta_ref, pages_ref, q_ref, kv_ref, o_ref, b, h, *, sm_scale, sliding_window, soft_cap,
                   group, group_pad, num_tokens, bq, page_size, pages_per_seq, kv_block, exact, sink):
    """The work of one prefill program of the attention launch: query block b, kv head h.
    q_ref is q as rows [T * Hq, D]; o_ref the output the same way (plus, in interpret mode, the
    spare rows from `sink` on: `_store_rows`). A zero block (kv_len 0) attends to no key: its
    rows store zeros.
    kv_ref is the cache as rows [num_pages * page_size, 2 * Hkv, D]: a KV block of
    `kv_block` keys is one slice of a page where pages hold whole blocks, else gathered row by
    row from its pages into one tile, so the dots are [M, kv_block] wide whatever the page size."""
    seq, start, rows, pos0, kv_len = (meta_ref[b, i] for i in range(5))
    m_rows = bq * group_pad
    num_kv_heads = kv_ref.shape[1] // 2
    dtype = dot_dtype(q_ref.dtype, kv_ref.dtype)  # an FP8 cache is widened to this after its loads
    i = lax.broadcasted_iota(jnp.int32, (m_rows,), 0)  # M row: token row i // group_pad, head i % group_pad
    g = i % group_pad
    # Rows past the block's end or the group read a real row (clamped) and are never stored.
    rows_at = q_row(jnp.minimum(start + i // group_pad, num_tokens - 1), h, g, group=group, num_kv_heads=num_kv_heads)
    q = q_ref[rows_at, :].astype(dtype)  # [M, D]
    head_dim = q.shape[-1]
    r = (i // group_pad)[:, None]  # [M, 1] token row of each M row
    q_pos = pos0 + r  # [M, 1]
    row_ok = r < rows  # [M, 1]
    last = pos0 + rows - 1  # causal limit of the block's last row
    num_blocks = jnp.where(kv_len > 0, (last + kv_block) // kv_block, 0)  # zero blocks: no keys
    first_block = 0 if sliding_window is None else jnp.minimum(
        jnp.maximum(pos0 - sliding_window + 1, 0) // kv_block, num_blocks)
    offsets = lax.broadcasted_iota(jnp.int32, (kv_block,), 0)  # [C]

    def block_step(c, stats, masked=True):
        m, l, acc = stats
        key_pos = c * kv_block + offsets  # [C]
        if page_size % kv_block == 0:  # the block lies in one page: one strided [C, D] slice
            per_page = page_size // kv_block  # blocks a page holds
            col = jnp.minimum(lax.div(c, per_page), pages_per_seq - 1)
            first_row = pages_ref[seq * pages_per_seq + col] * page_size + lax.rem(c, per_page) * kv_block
            k = kv_ref[pl.ds(first_row, kv_block), 2 * h, :]  # [C, D]
            v = kv_ref[pl.ds(first_row, kv_block), 2 * h + 1, :]  # [C, D]
        else:  # across pages: gathered row by row
            col = jnp.minimum(key_pos // page_size, pages_per_seq - 1)
            cache_row = pages_ref[seq * pages_per_seq + col] * page_size + key_pos % page_size  # [C]
            k = kv_ref[cache_row, 2 * h, :]  # [C, D]
            v = kv_ref[cache_row, 2 * h + 1, :]  # [C, D]
        k, v = k.astype(dtype), v.astype(dtype)
        s = _mm(q, k, trans_b=True, exact=exact) * sm_scale  # [M, C]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if masked:
            ok = (key_pos[None, :] <= q_pos) & row_ok  # [M, C]
            if sliding_window is not None:
                ok &= q_pos - key_pos[None, :] < sliding_window
            s = jnp.where(ok, s, -jnp.inf)
            v = jnp.where((key_pos < kv_len)[:, None], v, jnp.zeros_like(v))  # recycled pages may hold NaN
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [M]
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])  # [M, C]
        alpha = jnp.exp(m - m_safe)  # [M]
        pv = _mm(p.astype(v.dtype), v, trans_b=False, exact=exact)  # [M, D]
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    stats = (jnp.full((m_rows,), -jnp.inf, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
             jnp.zeros((m_rows, head_dim), jnp.float32))
    # Blocks wholly before the first row's position need no mask: every key is visible to every
    # row and lies below kv_len (rows past the block's end compute garbage that is never stored).
    # With a sliding window every block keeps its mask.
    num_open = first_block if sliding_window is not None else jnp.clip((pos0 + 1) // kv_block, 0, num_blocks)
    stats = lax.fori_loop(first_block, num_open, functools.partial(block_step, masked=False), stats)
    _, l, acc = lax.fori_loop(num_open, num_blocks, block_step, stats)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]  # cast by _store_rows
    # Rows past the block's end belong to other tokens, rows past the group to no head: masked,
    # never stored.
    keep = (i < rows * group_pad) & (g < group)  # [M]
    _store_rows(o_ref, rows_at, out, keep, sink)


# ---- the attention launch: prefill and decode programs in one grid -----------------------------

def _unit_work(u, real_decode, real_prefill, decode_units):
    """(is_prefill, index) of unit u of the attention launch, whose grid is (units, kv heads): a
    unit is a prefill block or a decode (slot, split). The real units of both kinds come first,
    interleaved in proportion (of the first u, u * real_prefill // (real_decode + real_prefill)
    are prefill blocks), so the programs resident on an SM mix bandwidth-bound decode work with
    matmul-bound prefill work; the spare units (unused decode slots, then empty prefill blocks)
    follow, and do nothing. Products stay below 2**31 for grids below ~46k units."""
    real = real_decode + real_prefill
    before = u * real_prefill // jnp.maximum(real, 1)  # prefill units among units < u
    upto = (u + 1) * real_prefill // jnp.maximum(real, 1)  # ... among units <= u
    spare = u - real
    spare_decode = decode_units - real_decode
    spare_prefill = spare >= spare_decode
    is_prefill = jnp.where(u < real, upto > before, spare_prefill)
    index = jnp.where(u < real, jnp.where(upto > before, before, u - upto),
                      jnp.where(spare_prefill, real_prefill + spare - spare_decode, real_decode + spare))
    return is_prefill, index


def _attend_kernel(units_ref, dec_meta_ref, pre_meta_ref, pages_ref, q_ref, kv_ref, kv_rows_ref, o_ref, *part_refs,
                   decode_units, num_splits, prefill, decode):
    """One launch for every query row of the step: prefill blocks (`_prefill_block`, static
    kwargs `prefill`) and, unless decode_units == 0, decode (slot, split) programs
    (`gpu_decode.decode_slot`, kwargs `decode`), ordered by `_unit_work` from units_ref (real
    decode units, real prefill units). With one split a decode program stores its rows straight
    into o_ref (q's row layout, like the prefill blocks); with several it stores a float32
    partial and its log-sum-exp into part_refs, [slot, split, Hkv, group_pad] rows, merged
    after the launch."""
    u, h = pl.program_id(0), pl.program_id(1)
    is_prefill, index = _unit_work(u, units_ref[0], units_ref[1], decode_units)

    @pl.when(is_prefill)
    def _():
        _prefill_block(pre_meta_ref, pages_ref, q_ref, kv_rows_ref, o_ref, index, h, **prefill)

    if not decode_units:
        return

    @pl.when(jnp.logical_not(is_prefill))
    def _():
        slot, split = index // num_splits, index % num_splits
        tok, kv_len, out, lse = decode_slot(dec_meta_ref, pages_ref, q_ref, kv_ref, slot, h, split, **decode)
        group, group_pad, num_kv_heads = decode["group"], decode["group_pad"], decode["num_kv_heads"]
        g = lax.broadcasted_iota(jnp.int32, (out.shape[0],), 0)
        if num_splits == 1:  # the rows themselves
            _store_rows(o_ref, q_row(tok, h, g, group=group, num_kv_heads=num_kv_heads), out,
                        (g < group) & (kv_len > 0), prefill["sink"])
        else:
            part_ref, lse_ref = part_refs
            base = ((slot * num_splits + split) * num_kv_heads + h) * group_pad
            keep = g < group_pad
            plgpu.store(part_ref.at[pl.ds(base, out.shape[0]), :], out,
                        mask=jnp.broadcast_to(keep[:, None], out.shape))
            plgpu.store(lse_ref.at[pl.ds(base, out.shape[0])], lse, mask=keep)


# ---- the public op --------------------------------------------------------------------------

DECODE_DEFAULTS = dict(pages_per_iter=None, num_splits=None, num_warps=4, num_stages=3, min_splits=None)
DECODE_IMPLS = ("pallas", "triton")
PREFILL_IMPLS = ("pallas", "cudnn")


@jax.named_scope("ragged_paged_attention_gpu")
def ragged_paged_attention_gpu(
    q,  # [T, num_q_heads, head_dim]
    k,  # [T, num_kv_heads, head_dim]
    v,  # [T, num_kv_heads, head_dim]
    kv_pages,  # [num_pages, page_size, 2*num_kv_heads, head_dim]
    kv_lens,  # [S] int32
    page_indices,  # [S, pages_per_seq] int32
    cu_q_lens,  # [S+1] int32
    num_seqs,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    q_block_size: int = 16,
    kv_block_size: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
    decode: dict | None = None,
    decode_impl: str = "pallas",
    decode_only: bool = False,
    prefill_impl: str = "pallas",
    rope=None,  # None or (cos, sin), each [T, head_dim] float32; decode_only only
    counts=None,  # None or int32 zeros [>= T * num_kv_heads]; decode_only only
    interpret: bool = False,
):
    """Writes k/v into kv_pages, then attends; returns (out [T, Hq, D] in q.dtype, new kv_pages).

    Same contract as the reference; the keyword arguments are static (jit-compatible as a plain
    function; donate kv_pages to update it in place). q_block_size / kv_block_size tune the
    prefill blocks, num_warps / num_stages (None: by the prefill tile's bytes) the attention
    launch; `decode` (keys of DECODE_DEFAULTS) the decode programs: pages_per_iter (None: 32 or
    128 keys per iteration, by the grid's size) and num_splits (None: from the grid); its
    num_warps / num_stages and min_splits are the decode-only op's (min_splits None: by the chip,
    `gpu_splits.min_splits_for`; the mixed op keeps the one-wave rule).
    decode_impl="triton" runs decode rows through `triton_decode.py` instead; `decode` then takes
    the keys of `triton_decode.DEFAULTS`. prefill_impl="cudnn" sends first chunks (prefill
    sequences with no cached key before them) to cuDNN's packed fused attention
    (`cudnn_prefill.py`; where it takes q's dtype and there is no soft cap), the other prefill
    sequences staying on the Pallas kernel.

    decode_only=True is the specialisation for batches where every sequence has exactly one
    query token and token i is sequence i's (cu_q_lens[:num_seqs + 1] == arange; the caller
    guarantees it, the op does not check): one launch writes the new K/V and attends
    (`gpu_decode.decode_only_attention`), with no KV-write or prefill launch and no relayout.
    With it, `rope=(cos, sin)` hands q and k over unrotated: the kernel applies the rotary
    embedding (rotate-half, as Hugging Face's Llama) to q and to the new k it stores: in an 8B
    decode step that removed rope of q, rope of k and v's copy, three launches a layer (batch 1
    on the H200: 4.70 -> 4.59 ms a step).
    """
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    _validate_blocks(q, kv_pages, q_block_size, kv_block_size, interpret)
    if prefill_impl not in PREFILL_IMPLS:
        raise ValueError(f"prefill_impl must be one of {', '.join(PREFILL_IMPLS)}, got {prefill_impl!r}")
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl must be one of {', '.join(DECODE_IMPLS)}, got {decode_impl!r}")
    if decode_impl == "triton":
        # Imported here: the Triton package is only needed (and only installed) for this path.
        from pallas_kernels import triton_decode

        defaults = triton_decode.DEFAULTS
    else:
        defaults = DECODE_DEFAULTS
    unknown = set(decode or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown decode options {sorted(unknown)} for decode_impl={decode_impl!r}; "
                         f"valid: {sorted(defaults)}")
    dec = {**defaults, **(decode or {})}
    if decode_impl == "triton":
        triton_decode.check_options(**dec)
        if kv_pages.dtype.itemsize == 1:
            raise ValueError("decode_impl='triton' does not read an FP8 cache; use the default 'pallas'")
    if rope is not None:
        if not decode_only:
            raise ValueError("rope= is only fused into the decode-only kernel (decode_only=True); "
                             "rotate q and k before the op otherwise")
        shape = (q.shape[0], q.shape[2])
        if q.shape[2] % 2 or any(table.shape != shape for table in rope):
            raise ValueError(f"rope tables must be (cos, sin) of shape {shape} (an even head_dim), "
                             f"got {[table.shape for table in rope]}")
    if decode_only:
        if decode_impl != "pallas":
            raise ValueError(f"decode_only=True runs the Pallas decode kernel, got decode_impl={decode_impl!r}")
        return decode_only_attention(
            q, k, v, kv_pages, kv_lens, page_indices, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret, rope=rope,
            counts=counts, **dec)
    if counts is not None:
        raise ValueError("counts= is only used by the decode-only kernel (decode_only=True)")
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    num_seqs_max, pages_per_seq = page_indices.shape
    bq = q_block_size
    exact = q.dtype == jnp.float32

    cu, q_lens, tok_seq, _, tok_pos, tok_valid = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_pages = _write_new_kv(kv_pages, k, v, page_indices, tok_seq, tok_pos, tok_valid, interpret)
    pages_flat = jnp.clip(page_indices, 0, num_pages - 1).reshape(-1).astype(jnp.int32)  # [S*pages_per_seq]

    q_rows = q.reshape(num_tokens * num_q_heads, head_dim)  # row t * Hq + j: token t's q head j

    # Prefill sequences (q_len > 1), then the zero blocks of padding (`_prefill_metadata`).
    num_blocks = -(-num_tokens // bq) + min(num_seqs_max, num_tokens // 2) + 1
    is_prefill = (jnp.arange(num_seqs_max) < num_seqs[0]) & (q_lens > 1)  # [S]
    out_c = None
    if prefill_impl == "cudnn" and cudnn_prefill.supports(q.dtype, head_dim, soft_cap):
        # First chunks (no cached keys before them) go to cuDNN; the Pallas kernel takes the rest.
        first = is_prefill & (kv_lens == q_lens)  # [S]
        # One segment slot per first chunk, at most T // 2 of them (each has 2 tokens or more).
        (seq,) = jnp.nonzero(first, size=min(num_seqs_max, max(num_tokens // 2, 1)), fill_value=num_seqs_max)
        in_use = seq < num_seqs_max
        seq = jnp.minimum(seq, num_seqs_max - 1)
        out_c = cudnn_prefill.first_chunk_attention(
            q, k, v, jnp.where(in_use, cu[seq], -1), jnp.where(in_use, q_lens[seq], -1), sm_scale=sm_scale,
            sliding_window=sliding_window, cache_dtype=kv_pages.dtype)
        is_prefill &= ~first
    pre_meta = _prefill_metadata(cu, q_lens, kv_lens, is_prefill, num_seqs, num_tokens, bq, num_blocks)
    # Static kwargs of both kinds of program (`_prefill_block`, `gpu_decode.decode_slot`).
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, group=group,
                  group_pad=group_pad, page_size=page_size, pages_per_seq=pages_per_seq, exact=exact)
    m_dec = decode_rows(group_pad)
    spare_rows = max(bq * group_pad, m_dec) if interpret else 0  # past the output's end (`_store_rows`)
    prefill = dict(common, num_tokens=num_tokens, bq=bq, kv_block=kv_block_size,
                   sink=num_tokens * num_q_heads if interpret else None)
    prefill_tile = 2 * kv_block_size * head_dim * kv_pages.dtype.itemsize  # K + V of a pipeline stage
    stages = num_stages or _prefill_stages(kv_block_size, head_dim, kv_pages.dtype.itemsize)

    # Decode sequences (q_len == 1): slot i is the i-th of them. With decode_impl="triton" they
    # are attended after the launch, which then holds the prefill blocks alone.
    is_decode = (q_lens == 1) & (jnp.arange(num_seqs_max) < num_seqs[0])  # [S]
    num_decode = jnp.sum(is_decode)
    slots, num_splits, decode_units, dec_meta, decode = 0, 1, 0, jnp.zeros((1, 4), jnp.int32), {}
    if decode_impl == "pallas":
        slots = min(num_seqs_max, num_tokens)
        seq_ids = jnp.arange(num_seqs_max, dtype=jnp.int32)
        rank = jnp.where(is_decode, jnp.cumsum(is_decode) - 1, slots)  # [S]
        slot_seq = jnp.zeros(slots, jnp.int32).at[rank].set(seq_ids, mode="drop")  # [slots]
        slot_valid = jnp.arange(slots) < num_decode
        slot_tok = jnp.where(slot_valid, cu[slot_seq], num_tokens)  # [slots] T: dropped below
        # Keys an iteration: 32 once the grid has a program per SM before splitting, else 128. In an
        # 8B decode step at ctx 1024 on the H100, 32 keys made attention 22% faster at batch 32 and 5%
        # at 256, but 10% slower in the 8-slot bucket of batch 1 (decode_profile_h100.md in
        # benchmarks/results).
        keys = 32 if slots * num_kv_heads >= NUM_SMS else 128
        pages_per_iter = dec["pages_per_iter"] or max(1, min(keys // page_size, pages_per_seq))
        if dec["num_splits"]:
            num_splits = used_splits = dec["num_splits"]
        else:
            # Programs of both kinds share the launch: the larger pipeline sets how many are resident.
            decode_tile = 2 * pages_per_iter * page_size * head_dim * kv_pages.dtype.itemsize
            wave = wave_size(max(decode_tile, prefill_tile), stages)
            num_splits = num_splits_for(slots, num_kv_heads, pages_per_seq, pages_per_iter, wave)
            used_splits = split_count(num_decode, num_kv_heads, num_splits, wave)
        dec_meta = jnp.stack([slot_seq, jnp.minimum(slot_tok, num_tokens - 1),
                              jnp.where(slot_valid, kv_lens[slot_seq], 0),
                              jnp.broadcast_to(used_splits, (slots,))], axis=1).astype(jnp.int32)  # [slots, 4]
        decode_units = slots * num_splits
        decode = dict(common, pages_per_iter=pages_per_iter, num_kv_heads=num_kv_heads)
    units = jnp.stack([num_decode * num_splits if decode_units else 0,
                       jnp.sum(pre_meta[:, 2] > 0)]).astype(jnp.int32)  # real (decode, prefill) units
    out_shape = [jax.ShapeDtypeStruct((num_tokens * num_q_heads + spare_rows, head_dim), q.dtype)]
    partial_rows = slots * num_splits * num_kv_heads * group_pad
    if decode_units and num_splits > 1:  # m_dec spare rows: the last program's masked tile stays in bounds
        out_shape += [jax.ShapeDtypeStruct((partial_rows + m_dec, head_dim), jnp.float32),
                      jax.ShapeDtypeStruct((partial_rows + m_dec,), jnp.float32)]
    kernel = functools.partial(_attend_kernel, decode_units=decode_units, num_splits=num_splits,
                               prefill=prefill, decode=decode)
    whole = pl.BlockSpec()
    res = pl.pallas_call(
        kernel,
        grid=(max(decode_units + num_blocks, 1), num_kv_heads),
        in_specs=[whole] * 7,
        out_specs=[whole] * len(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu_attend",
    )(units, dec_meta, pre_meta, pages_flat, q_rows, kv_pages,
      kv_pages.reshape(num_pages * page_size, two_hkv, head_dim))
    # Every row is stored by the launch: prefill and decode rows, padding tokens' zeros (cuDNN's
    # first chunks excepted: merged below), so no pass over the output follows it.
    out = res[0][: num_tokens * num_q_heads].reshape(num_tokens, num_q_heads, head_dim)
    if len(res) > 1:  # several splits: merge the partials, store the decode rows
        merged = merge_splits(res[1][:partial_rows].reshape(slots, num_splits, num_kv_heads, group_pad, head_dim),
                              res[2][:partial_rows].reshape(slots, num_splits, num_kv_heads, group_pad))
        merged = merged[:, :, :group].reshape(slots, num_q_heads, head_dim).astype(q.dtype)
        out = out.at[slot_tok].set(merged, mode="drop")
    if out_c is not None:
        out = jnp.where((tok_valid & first[tok_seq])[:, None, None], out_c, out)
    if decode_impl == "triton":  # decode rows written in place into `out`
        out = triton_decode.decode_attention_triton(
            out, q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret, **dec)
    return out, kv_pages
