"""Ragged paged attention for TPU: a Pallas kernel lowered through Mosaic.

Same contract and cache layout as `pallas_kernels.reference.ragged_paged_attention_reference`:
one call serves a ragged batch of T query rows (decodes, prefill chunks, padding); sequence i
owns q rows cu_q_lens[i]:cu_q_lens[i+1], the last q_len positions of a sequence kv_lens[i] long
after this step. The new K/V of every real token is written into its page inside the kernel,
then each query row attends causally (GQA, optional sliding window and soft-cap) over its pages.

How it runs:
- Query rows are cut, in jnp outside the kernel, into blocks of `q_block_size` rows of ONE
  sequence. Per block, [sequence, rows, first row's position] and the flattened page table are
  scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`); the grid walks the blocks.
  Padding blocks have 0 rows and do nothing.
- All kv heads are handled in one grid step, because a page holds them all: for kv head h, the
  block's q rows of its group of q heads are stacked in M = q_block_size * group rows.
- The cache stays in HBM (`memory_space=pl.ANY`), aliased to the output. Each block first DMAs
  its own new K/V rows into their pages and WAITS for them, and only then starts reading pages,
  so a sequence's new tokens are in place before its own queries read them. Earlier blocks of
  the same sequence wrote their tokens in earlier grid steps: that is why the prefill grid is
  "arbitrary" (sequential), never "parallel".
- Pages are read in chunks of `pages_per_kv_block` pages with double-buffered DMA (chunk c+1 is
  in flight while chunk c is computed); pages past the block's causal limit are not fetched.
  Softmax is online, in float32. Scores past the causal limit / outside the window are masked
  with `jnp.where` and V past the limit is zeroed, so NaN in recycled pages (or in VMEM buffers
  left unfilled) never reaches an output.
- `batch_kind` picks the specialisation (static): "decode" runs one call with one sequence per
  grid step (q_block_size 1, M = group rows; the caller promises every q_len <= 1); "prefill"
  runs one call with `q_block_size`-row blocks for all sequences; "mixed" (default) runs both:
  sequences with one query token in the decode call, the others in the prefill call. The decode
  grid is "parallel" (megacore may split it): each decode writes one slot of its own last page
  and reads only its own pages (pages shared through prefix caching are full, never written).
- The flattened page table must fit SMEM: max_num_seqs * pages_per_seq * 4 B is checked against
  SMEM_TABLE_LIMIT_BYTES, and the ValueError names the smallest page size that would fit.

Head dim is used as given (the cache layout is shared with the reference): 128 or 256 fill the
TPU's 128 lanes; 64 works but wastes half of every vector register. `q_block_size` and
`pages_per_kv_block` default to sizes that fit the chip's VMEM (table below).

Verified in Pallas' TPU interpret mode on CPU only (no TPU is lent here): results against the
reference, the interpreter's race detector, and Pallas' lowering to the Mosaic dialect. Mosaic's
own compile (libtpu) has never run on it: its layout rules (e.g. strided sublane loads of packed
bf16 K/V rows) may still ask for changes on a real TPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.reference import _token_layout, _validate, to_cache_dtype

# VMEM per TensorCore by device_kind substring (MiB); unknown chips and CPU get the smallest.
_VMEM_MIB = (("v5 lite", 128), ("v5e", 128), ("v6", 128), ("v5p", 64), ("7x", 64), ("v4", 16))
_DEFAULT_VMEM_MIB = 16
# SMEM is 1 MiB per core; the page table may take half, the rest is block metadata and Mosaic's.
SMEM_TABLE_LIMIT_BYTES = 512 * 1024
_BATCH_KINDS = ("mixed", "decode", "prefill")


def _vmem_budget_bytes() -> int:
    kind = jax.devices()[0].device_kind.lower()
    mib = next((m for name, m in _VMEM_MIB if name in kind), _DEFAULT_VMEM_MIB)
    return mib * 1024 * 1024 // 2  # half: the rest is Mosaic's internal scratch and headroom


def _vmem_bytes(bq, ppb, page_size, num_kv_heads, group, head_dim, itemsize) -> int:
    m_rows, chunk = bq * group, ppb * page_size
    kv_bufs = 2 * chunk * 2 * num_kv_heads * head_dim * itemsize  # double-buffered pages
    q_and_out = 2 * 2 * num_kv_heads * m_rows * head_dim * itemsize  # pipelined in and out blocks
    new_kv = 2 * bq * 2 * num_kv_heads * head_dim * itemsize
    stats = num_kv_heads * m_rows * (head_dim + 2 * 128) * 4  # acc, and m/l padded to 128 lanes
    scores = 4 * m_rows * chunk * 4  # s, p and masks of one head
    return kv_bufs + q_and_out + new_kv + stats + scores


def _pick_pages_per_kv_block(bq, page_size, dims, budget, target_tokens) -> int:
    ppb = max(1, target_tokens // page_size)
    while ppb > 1 and _vmem_bytes(bq, ppb, page_size, *dims) > budget:
        ppb //= 2
    return ppb


def _check_smem(num_seqs_max, pages_per_seq, page_size) -> None:
    nbytes = num_seqs_max * pages_per_seq * 4
    if nbytes <= SMEM_TABLE_LIMIT_BYTES:
        return
    max_pages = SMEM_TABLE_LIMIT_BYTES // (4 * num_seqs_max)
    if max_pages == 0:
        raise ValueError(f"max_num_seqs={num_seqs_max} is too large for the TPU page table in SMEM "
                         f"(limit {SMEM_TABLE_LIMIT_BYTES} B); lower max_num_seqs")
    need = -(-pages_per_seq * page_size // max_pages)  # tokens per page so the table fits
    fit = 1 << (need - 1).bit_length()
    raise ValueError(f"page table max_num_seqs={num_seqs_max} x pages_per_seq={pages_per_seq} x 4 B = {nbytes} B "
                     f"exceeds the TPU SMEM limit of {SMEM_TABLE_LIMIT_BYTES} B; use page_size >= {fit} "
                     f"(or fewer max_num_seqs / a shorter max_model_len)")


def _blocks(cu, q_lens, kv_lens, selected, bq, num_blocks):
    """Cut the selected sequences' query rows into blocks of bq rows of one sequence.
    Returns meta [NB*3] (seq, rows, first row's position), first token [NB], cu_blocks [S+1]."""
    num_seqs_max = kv_lens.shape[0]
    counts = jnp.where(selected, -(-q_lens // bq), 0)  # [S]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])  # [S+1]
    b = jnp.arange(num_blocks, dtype=jnp.int32)  # [NB]
    seq = jnp.clip(jnp.searchsorted(cu_blocks, b, side="right") - 1, 0, num_seqs_max - 1)  # [NB]
    first = (b - cu_blocks[seq]) * bq  # [NB] first row among the sequence's queries
    rows = jnp.where(b < cu_blocks[-1], jnp.clip(q_lens[seq] - first, 0, bq), 0)  # [NB]
    pos0 = kv_lens[seq] - q_lens[seq] + first  # [NB]
    meta = jnp.stack([seq, rows, pos0], axis=1).reshape(-1).astype(jnp.int32)  # [NB*3]
    return meta, cu[seq] + first, cu_blocks


def _kernel(meta_ref, pages_ref,  # SMEM: [NB*3], [S*pages_per_seq]
            q_ref,  # [1, Hkv, M, D] VMEM block
            new_kv_ref,  # [1, bq*2Hkv, D] VMEM block: the block's new K/V rows, interleaved
            kv_in_ref,  # [num_pages, page_size*2Hkv, D] HBM, aliased with kv_ref
            o_ref,  # [1, Hkv, M, D] VMEM block
            kv_ref,  # [num_pages, page_size*2Hkv, D] HBM: the cache, read and written here
            kv_buf,  # [2, chunk*2Hkv, D] VMEM: double buffer of pages
            read_sems, write_sem,  # DMA semaphores [2], [1]
            m_scr, l_scr, acc_scr,  # [Hkv, M, 1], [Hkv, M, 1], [Hkv, M, D] float32
            *, group, ppb, page_size, pages_per_seq, sm_scale, sliding_window, soft_cap):
    del kv_in_ref  # the same buffer as kv_ref (input_output_aliases)
    b = pl.program_id(0)
    seq, rows, pos0 = meta_ref[3 * b], meta_ref[3 * b + 1], meta_ref[3 * b + 2]
    num_kv_heads, m_rows, _ = acc_scr.shape
    two_hkv, num_pages = 2 * num_kv_heads, kv_ref.shape[0]
    chunk = ppb * page_size
    # lax.div/rem below: every operand is >= 0, so no sign fix-up ops (jnp's // and % add them).
    last = pos0 + rows - 1  # causal limit of the block's last row
    last_page = lax.div(last, page_size)

    def page_of(idx):  # idx-th page of the sequence
        return jnp.clip(pages_ref[seq * pages_per_seq + jnp.minimum(idx, pages_per_seq - 1)], 0, num_pages - 1)

    def write_copy(r):  # row r's new K/V -> its slot in its page
        pos = pos0 + r
        slot_rows = pl.ds(lax.rem(pos, page_size) * two_hkv, two_hkv)
        return pltpu.make_async_copy(new_kv_ref.at[0, pl.ds(r * two_hkv, two_hkv)],
                                     kv_ref.at[page_of(lax.div(pos, page_size)), slot_rows], write_sem.at[0])

    def page_copy(c, slot, i):  # page i of chunk c -> its place in buffer slot
        return pltpu.make_async_copy(
            kv_ref.at[page_of(c * ppb + i)], kv_buf.at[slot, pl.ds(i * page_size * two_hkv, page_size * two_hkv)],
            read_sems.at[slot])

    def num_chunk_pages(c):  # pages past the causal limit are never fetched
        return jnp.minimum(ppb, last_page - c * ppb + 1)

    def start_chunk(c, slot):
        lax.fori_loop(0, num_chunk_pages(c), lambda i, _: page_copy(c, slot, i).start(), None)

    def wait_chunk(c, slot):
        lax.fori_loop(0, num_chunk_pages(c), lambda i, _: page_copy(c, slot, i).wait(), None)

    def compute(c, slot):
        r = lax.div(lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0), group)  # [M, 1] block row of each M row
        q_pos = pos0 + r  # [M, 1]
        key_pos = c * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)  # [1, C]
        ok = (key_pos <= q_pos) & (r < rows)  # [M, C]
        if sliding_window is not None:
            ok &= q_pos - key_pos < sliding_window
        v_ok = c * chunk + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) <= last  # [C, 1]
        kv = kv_buf.at[slot]  # [C*2Hkv, D]
        for h in range(num_kv_heads):
            # Strided sublane loads. For bf16 on a real TPU, K and V rows of a token share packed
            # sublanes; Mosaic may want them read as uint32 and split (interpret mode cannot bitcast refs).
            k = kv[pl.ds(2 * h, chunk, stride=two_hkv), :]  # [C, D]
            v = kv[pl.ds(2 * h + 1, chunk, stride=two_hkv), :]  # [C, D]
            q = q_ref[0, h]  # [M, D]
            # An FP8 cache (no implicit promotion) is widened to q's dtype.
            dtype = q.dtype if k.dtype.itemsize == 1 else jnp.promote_types(q.dtype, k.dtype)
            q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
            v = jnp.where(v_ok, v, jnp.zeros_like(v))
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * sm_scale  # [M, C]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(ok, s, -jnp.inf)
            m_prev = m_scr[h]  # [M, 1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)  # all-masked rows: exp(-inf - 0) = 0
            p = jnp.exp(s - m_safe)  # [M, C]
            alpha = jnp.exp(m_prev - m_safe)  # [M, 1]
            l_scr[h] = alpha * l_scr[h] + jnp.sum(p, axis=1, keepdims=True)
            acc_scr[h] = alpha * acc_scr[h] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            m_scr[h] = m_new

    @pl.when(rows > 0)
    def _():
        # 1. This block's new K/V into the cache, complete before any page of it is read.
        lax.fori_loop(0, rows, lambda r, _: write_copy(r).start(), None)
        lax.fori_loop(0, rows, lambda r, _: write_copy(r).wait(), None)  # one semaphore: waits are interchangeable

        # 2. Online softmax over chunks [first_chunk, num_chunks), double-buffered.
        first_chunk = 0 if sliding_window is None else lax.div(jnp.maximum(pos0 - sliding_window + 1, 0), chunk)
        num_chunks = lax.div(last, chunk) + 1
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)
        start_chunk(first_chunk, 0)

        def body(c, _):
            slot = lax.rem(c - first_chunk, 2)
            wait_chunk(c, slot)
            pl.when(c + 1 < num_chunks)(lambda: start_chunk(c + 1, 1 - slot))
            compute(c, slot)

        lax.fori_loop(first_chunk, num_chunks, body, None)
        l = l_scr[...]
        o_ref[0] = (acc_scr[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)

    @pl.when(rows == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _attend(q_blocks, new_kv_blocks, kv_flat, meta, pages_flat, *, group, ppb, page_size, pages_per_seq,
            parallel, interpret, vmem_limit, **static):
    """One pallas_call over blocks; returns ([NB, Hkv, M, D], updated kv_flat)."""
    num_blocks, num_kv_heads, m_rows, head_dim = q_blocks.shape
    kernel = functools.partial(_kernel, group=group, ppb=ppb, page_size=page_size,
                               pages_per_seq=pages_per_seq, **static)
    block = pl.BlockSpec((1, num_kv_heads, m_rows, head_dim), lambda b, *_: (b, 0, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(num_blocks,),
        in_specs=[block, pl.BlockSpec((1,) + new_kv_blocks.shape[1:], lambda b, *_: (b, 0, 0)), hbm],
        out_specs=[block, hbm],
        scratch_shapes=[
            pltpu.VMEM((2, ppb * page_size * 2 * num_kv_heads, head_dim), kv_flat.dtype),
            pltpu.SemaphoreType.DMA((2,)),
            pltpu.SemaphoreType.DMA((1,)),
            pltpu.VMEM((num_kv_heads, m_rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, m_rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, m_rows, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q_blocks.shape, q_blocks.dtype),
                   jax.ShapeDtypeStruct(kv_flat.shape, kv_flat.dtype)],
        input_output_aliases={4: 1},  # kv_flat (after the 2 prefetch args, q and new kv) -> output 1
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel" if parallel else "arbitrary",), vmem_limit_bytes=vmem_limit),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(meta, pages_flat, q_blocks, new_kv_blocks, kv_flat)


@jax.named_scope("ragged_paged_attention_tpu")
def ragged_paged_attention_tpu(
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
    interpret=False,
    batch_kind: str = "mixed",
    q_block_size: int = 32,
    pages_per_kv_block: int | None = None,
    decode_pages_per_kv_block: int | None = None,
):
    """Writes k/v into kv_pages, then attends; returns (out [T, Hq, D] in q.dtype, new kv_pages).

    Same contract as the reference; keyword arguments are static (jit-compatible as a plain
    function; donate kv_pages so the in-kernel write is in place). `interpret`: False on TPU,
    True or a `pltpu.InterpretParams` elsewhere. `batch_kind`: "mixed", "decode" (every q_len
    <= 1, promised by the caller) or "prefill" (see the module docstring). Pages per KV block
    default to what fits half the chip's VMEM (decode aims at 512 tokens per chunk, prefill 256).
    """
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if batch_kind not in _BATCH_KINDS:
        raise ValueError(f"batch_kind must be one of {_BATCH_KINDS}, got {batch_kind!r}")
    if q_block_size < 1 or (pages_per_kv_block or 1) < 1 or (decode_pages_per_kv_block or 1) < 1:
        raise ValueError("q_block_size, pages_per_kv_block and decode_pages_per_kv_block must be >= 1")
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads, group = two_hkv // 2, num_q_heads // (two_hkv // 2)
    num_seqs_max, pages_per_seq = page_indices.shape
    _check_smem(num_seqs_max, pages_per_seq, page_size)

    cu, q_lens, tok_seq, tok_j, _, tok_valid = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    real = jnp.arange(num_seqs_max) < num_seqs[0]  # [S]
    new_kv = to_cache_dtype(jnp.stack([k, v], axis=2).reshape(num_tokens, two_hkv, head_dim), kv_pages.dtype)  # [T, 2Hkv, D]
    new_kv = jnp.pad(new_kv, ((0, 1), (0, 0), (0, 0)))  # [T+1, 2Hkv, D] row T: dummy for padding rows
    q_pad = jnp.pad(q, ((0, 1), (0, 0), (0, 0)))  # [T+1, Hq, D]
    kv_flat = kv_pages.reshape(num_pages, page_size * two_hkv, head_dim)  # free: row-major bitcast
    pages_flat = page_indices.reshape(-1).astype(jnp.int32)  # [S*pages_per_seq]
    budget = _vmem_budget_bytes()
    if interpret is True:  # Pallas' TPU interpreter (DMAs, semaphores) is faster than the generic one
        interpret = pltpu.InterpretParams()
    dims = (num_kv_heads, group, head_dim, kv_pages.dtype.itemsize)

    calls = []  # (selected sequences [S], block rows, pages per KV block, max blocks, parallel grid)
    if batch_kind in ("mixed", "decode"):
        ppb = decode_pages_per_kv_block or _pick_pages_per_kv_block(1, page_size, dims, budget, 512)
        selected = real & (q_lens == 1) if batch_kind == "mixed" else real & (q_lens > 0)
        calls.append((selected, 1, ppb, min(num_seqs_max, num_tokens), True))
    if batch_kind in ("mixed", "prefill"):
        bq = min(q_block_size, num_tokens)
        while bq > 8 and _vmem_bytes(bq, 1, page_size, *dims) > budget:  # huge heads: fewer rows per block
            bq //= 2
        ppb = pages_per_kv_block or _pick_pages_per_kv_block(bq, page_size, dims, budget, 256)
        selected = real & (q_lens > 1) if batch_kind == "mixed" else real
        max_seqs = min(num_seqs_max, num_tokens // 2 if batch_kind == "mixed" else num_tokens)
        calls.append((selected, bq, ppb, min(num_tokens, num_tokens // bq + max_seqs), False))

    out = jnp.zeros((num_tokens, num_q_heads, head_dim), q.dtype)
    for selected, bq, ppb, num_blocks, parallel in calls:
        if num_blocks == 0:
            continue
        meta, tok0, cu_blocks = _blocks(cu, q_lens, kv_lens, selected, bq, num_blocks)
        rows = meta.reshape(num_blocks, 3)[:, 1]
        tok = tok0[:, None] + jnp.arange(bq)  # [NB, bq]
        tok = jnp.where(jnp.arange(bq) < rows[:, None], tok, num_tokens)  # padding rows -> dummy row T
        q_blocks = q_pad[tok].reshape(num_blocks, bq, num_kv_heads, group, head_dim)
        q_blocks = q_blocks.transpose(0, 2, 1, 3, 4).reshape(num_blocks, num_kv_heads, bq * group, head_dim)
        new_kv_blocks = new_kv[tok].reshape(num_blocks, bq * two_hkv, head_dim)  # [NB, bq*2Hkv, D]
        vmem_limit = min(2 * budget, max(32 << 20, 2 * _vmem_bytes(bq, ppb, page_size, *dims)))
        out_blocks, kv_flat = _attend(
            q_blocks, new_kv_blocks, kv_flat, meta, pages_flat, group=group, ppb=ppb,
            page_size=page_size, pages_per_seq=pages_per_seq, parallel=parallel, interpret=interpret,
            vmem_limit=vmem_limit, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        # Back to tokens: token t of a selected sequence is row j % bq of block cu_blocks[seq] + j // bq.
        out_rows = out_blocks.reshape(num_blocks, num_kv_heads, bq, group, head_dim).transpose(0, 2, 1, 3, 4)
        out_rows = out_rows.reshape(num_blocks * bq, num_q_heads, head_dim)  # [NB*bq, Hq, D]
        row = (cu_blocks[tok_seq] + tok_j // bq) * bq + tok_j % bq  # [T]
        mine = tok_valid & selected[tok_seq]  # [T]
        out = jnp.where(mine[:, None, None], out_rows[jnp.clip(row, 0, num_blocks * bq - 1)], out)
    return out, kv_flat.reshape(kv_pages.shape)
