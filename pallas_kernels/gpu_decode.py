"""The decode path of the GPU kernel: one query token per sequence, split-KV (flash-decoding).

A decode step reads every cached page of every sequence once and does little arithmetic with it,
so it is bound by HBM bandwidth, and what matters is keeping enough loads in flight on every SM:
- One program per (slot, kv head, split) (`decode_slot`: units of the mixed op's one attention
  launch, beside its prefill blocks). A slot is one decode sequence; the group's q heads are folded
  into the M dimension of one tile (M = max(16, group padded to a power of two) rows: Triton's
  smallest dot), so K and V of a kv head are read once for the whole group.
- When slots x kv heads is too small to fill the GPU, each sequence's pages are cut into
  contiguous ranges, one per program; each writes a float32 partial output and its log-sum-exp,
  and a small jnp step merges the splits (XLA makes two ~1.7 us kernels of it; one Pallas merge
  kernel took as long, 3.3 us, on the H200). The decode-only kernel can merge them itself (the
  last split of a head to finish merges, found with an atomic counter): on the H100 a batch-1
  step then runs 374 kernels instead of 438 and took 5.87 ms against 5.93 in the same lease
  (benchmarks/results/h100_session15.md). The grid has room for `num_splits` ranges; how many
  are used is data (`gpu_splits.split_count`): enough to fill one wave of resident programs (`wave_size`,
  from the shared memory a program's pipeline takes) for the slots that hold a sequence, so a
  batch-1 step in a 16-slot bucket splits like a 1-slot grid (the spare programs read nothing);
  on the H200 at least two while the slots alone fill one wave and the longest sequence holds
  2k keys or more (`gpu_splits.MIN_SPLITS_BY_CHIP`).
- Each loop iteration visits `pages_per_iter` pages (unrolled; default 32 keys when slots x kv
  heads fill the SMs, else 128), and `num_stages` asks Triton's software pipeliner to prefetch
  the next iteration's pages while this one computes (2 vs 3 stages, 4 vs 8 warps: within noise
  on the H100; 256 keys per iteration was 15-30% slower than 128; in an 8B decode step 32 keys
  beat 128 by 22% at batch 32 and 5% at 256 but lost 10% at batch 1, and 16 keys lost
  everywhere). Numbers: benchmarks/results/gpu_kernel_bench_h100.md, decode_profile_h100.md.

Batches where every sequence decodes have their own kernel (`decode_only_attention`): one launch
that reads q, k and v as rows of the q/k/v projection's output, optionally applies the rotary
embedding to q and k, stores the new K/V into its page and attends (split merge after it when the
grid splits). Before, an 8B decode step launched rope of q, rope of k and v's copy between the
projection and this kernel, each layer. The one kernel left between them (1.5-2.4 us at batch
1 on the H200) is the split-K reduction of XLA's merged q/k/v matmul, which writes the q/k/v
rows this kernel reads: the concatenation below costs nothing
(benchmarks/results/h200_session10.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu_splits import (MIN_SPLITS_KEYS, NUM_SMS, decode_only_programs, min_splits_for,
                                       num_splits_for, split_count, wave_size)
from pallas_kernels.reference import to_cache_dtype


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_dtype(q_dtype, kv_dtype):
    """The inputs' dtype of the attention dots: q's, except that a 16-bit query over an FP8 cache
    computes in float16. Every e4m3 and e5m2 value is exactly a float16, one conversion
    instruction per pair on Hopper; the widening to bfloat16 takes several. With bf16 dots the
    decode-only op over an FP8 cache read it at 0.71 of the copy rate (H100, batch 256); the
    float16 dots took an 8B engine decode step there from 14.12 to 13.21 ms
    (benchmarks/results/h100_session19.md). Queries and probabilities lose nothing in float16
    (three more mantissa bits than bfloat16; queries stay far below its largest value, 65504)."""
    if jnp.dtype(kv_dtype).itemsize == 1 and jnp.dtype(q_dtype).itemsize == 2:
        return jnp.dtype(jnp.float16)
    return jnp.dtype(q_dtype)


def decode_rows(group_pad: int) -> int:
    """Rows of the q tile: the padded group, at least 16 (Triton's smallest dot)."""
    return max(16, group_pad)


def q_row(token, h, g, *, group: int, num_kv_heads: int):
    """Row of q head h * group + g of `token` in q as rows [T * Hq, D] (the layout both attention
    kernels of the mixed op read, a free reshape of [T, Hq, D]); g is clamped into the group, so
    a tile's rows past it repeat its last head."""
    return token * (group * num_kv_heads) + h * group + jnp.minimum(g, group - 1)


def _attend(q_parts, kv_ref, page_at, h, begin, num_iters, num_keys, q_pos, *, sm_scale,
            sliding_window, soft_cap, page_size, pages_per_iter, exact):
    """Online softmax of the query at position q_pos, its q heads as rows [M, D] given in column
    parts (`q_parts`: one [M, D] tile, or its two halves when rope was applied in the kernel),
    over the cached keys < num_keys (num_keys - 1 <= q_pos) in pages begin .. begin + num_iters
    * pages_per_iter of one sequence (`page_at(col)` -> page id). Returns the running (max, sum,
    acc) stats."""
    m_rows, head_dim = q_parts[0].shape[0], kv_ref.shape[-1]
    starts = [sum(part.shape[1] for part in q_parts[:i]) for i in range(len(q_parts))]
    dtype = dot_dtype(q_parts[0].dtype, kv_ref.dtype)
    q_parts = [part.astype(dtype) for part in q_parts]

    def page_step(col, stats):
        m, l, acc = stats
        page = page_at(col)
        # An FP8 cache is widened after the load (`dot_dtype`): the bytes read are halved.
        s = sum(plgpu.dot(part, kv_ref[page, :, 2 * h, pl.ds(lo, part.shape[1])].astype(dtype),
                          trans_b=True, allow_tf32=not exact)
                for part, lo in zip(q_parts, starts)) * sm_scale  # [M, P]
        v = kv_ref[page, :, 2 * h + 1, :].astype(dtype)  # [P, D]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = col * page_size + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)  # [1, P]
        ok = key_pos < num_keys  # causal: every cached key is at or before the query
        if sliding_window is not None:
            ok &= q_pos - key_pos < sliding_window
        s = jnp.where(ok, s, -jnp.inf)
        key_in = lax.broadcasted_iota(jnp.int32, (page_size, 1), 0) + col * page_size < num_keys  # [P, 1]
        v = jnp.where(key_in, v, jnp.zeros_like(v))  # recycled pages may hold NaN
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [M]
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])  # [M, P]
        alpha = jnp.exp(m - m_safe)
        pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=not exact)  # [M, D]
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    def body(i, stats):
        for j in range(pages_per_iter):  # unrolled
            stats = page_step(begin + i * pages_per_iter + j, stats)
        return stats

    stats = (jnp.full((m_rows,), -jnp.inf, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
             jnp.zeros((m_rows, head_dim), jnp.float32))
    return lax.fori_loop(0, num_iters, body, stats)


def _add_key(stats, q_parts, k_parts, v, take, *, sm_scale, soft_cap):
    """One more key (in column parts matching `q_parts`; v [D]) into the online softmax of the
    query rows, where `take` (traced bool)."""
    m, l, acc = stats
    s = sum(jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)
            for q, k in zip(q_parts, k_parts)) * sm_scale  # [M]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(take, s, -jnp.inf)
    m_new = jnp.maximum(m, s)
    m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    p, alpha = jnp.exp(s - m_safe), jnp.exp(m - m_safe)  # [M]
    v = jnp.where(take, v.astype(jnp.float32), 0.0)  # a padding token's v may be NaN
    return m_new, alpha * l + p, alpha[:, None] * acc + p[:, None] * v[None, :]


def _rotate_half(lo, hi, cos, sin):
    """The rotary embedding (rotate-half, as Hugging Face's Llama) of rows given as halves
    lo, hi [..., D/2], with cos, sin as halves too: (lo*cos - hi*sin, hi*cos + lo*sin) in
    float32, cast back: the same arithmetic as the model's `apply_rope`."""
    (cos_lo, cos_hi), (sin_lo, sin_hi) = cos, sin
    lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
    return ((lo32 * cos_lo - hi32 * sin_lo).astype(lo.dtype),
            (hi32 * cos_hi + lo32 * sin_hi).astype(hi.dtype))


def _finish(stats):
    """(out [M, D] normalised, log-sum-exp [M]; -inf where no key was seen)."""
    m, l, acc = stats
    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[:, None]
    return out, jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)


def _split_range(num_keys, q_pos, split, used_splits, *, page_size, pages_per_iter, sliding_window):
    """This split's first page and number of loop iterations over the pages of the first
    num_keys keys (the window's, for a query at q_pos). Whole iterations per split, so only the
    last split has a partial one (masked by num_keys); splits past `used_splits` start past the
    end and read nothing."""
    num_pages = (num_keys + page_size - 1) // page_size
    first_page = 0 if sliding_window is None else jnp.maximum(q_pos + 1 - sliding_window, 0) // page_size
    per_split = (num_pages - first_page + used_splits - 1) // used_splits
    per_split = (per_split + pages_per_iter - 1) // pages_per_iter * pages_per_iter
    begin = first_page + split * per_split
    end = jnp.minimum(begin + per_split, num_pages)
    return begin, jnp.maximum(end - begin + pages_per_iter - 1, 0) // pages_per_iter


def decode_slot(meta_ref, pages_ref, q_ref, kv_ref, slot, h, split, *, group, group_pad, page_size,
                pages_per_seq, pages_per_iter, num_kv_heads, sliding_window, **attend):
    """The work of one decode program of the mixed op (`gpu.ragged_paged_attention_gpu`'s
    attention launch): kv head h of decode slot `slot`, over the pages of its split `split`.
    meta_ref rows are (sequence, token, kv_len, splits used) per slot, kv_len 0 for unused slots;
    q_ref is q as rows [T * Hq, D]. Returns (token, kv_len, out [M, D] float32, lse [M]) for the
    group's q heads as M = decode_rows(group_pad) rows (rows past the group: garbage)."""
    seq, tok, kv_len, used_splits = meta_ref[slot, 0], meta_ref[slot, 1], meta_ref[slot, 2], meta_ref[slot, 3]
    g = lax.broadcasted_iota(jnp.int32, (decode_rows(group_pad),), 0)
    q = q_ref[q_row(tok, h, g, group=group, num_kv_heads=num_kv_heads), :]  # [M, D] rows past the group: ignored
    begin, num_iters = _split_range(kv_len, kv_len - 1, split, used_splits, page_size=page_size,
                                    pages_per_iter=pages_per_iter, sliding_window=sliding_window)
    page_at = lambda col: pages_ref[seq * pages_per_seq + jnp.minimum(col, pages_per_seq - 1)]
    out, lse = _finish(_attend((q,), kv_ref, page_at, h, begin, num_iters, kv_len, kv_len - 1,
                               page_size=page_size, pages_per_iter=pages_per_iter,
                               sliding_window=sliding_window, **attend))
    return tok, kv_len, out, lse


def merge_splits(out, lse):
    """out [S, splits, Hkv, G, D], lse [S, splits, Hkv, G] -> [S, Hkv, G, D] float32: weights
    exp(lse_s - max); splits without keys have lse -inf (weight 0)."""
    top = lse.max(axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)  # [S, splits, Hkv, G]
    total = w.sum(axis=1)
    merged = jnp.einsum("sphg,sphgd->shgd", w, out)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


# ---- decode-only batches: one kernel, KV write fused ------------------------------------------

def _decode_only_kernel(meta_ref, kv_lens_ref, pages_ref, qkv_ref, cos_ref, sin_ref, kv_in_ref,
                        *refs, num_tokens, group, num_q_heads, num_kv_heads, page_size, num_pages,
                        pages_per_iter, num_splits, sliding_window, rope, fused_merge, num_working,
                        interpret, **attend):
    """A flat grid: program p is (token, kv head, split) for the splits this step uses, token
    slowest, so the working programs come first and the grid holds only as many as the busiest
    sequence count needs (`decode_only_programs`). Token t is sequence t's only query; its q,
    k and v heads are rows of qkv_ref (`rows_per_token` a token). With `rope`, q and the new k
    are rotated here (by cos_ref/sin_ref [T, D] of token t), in halves of the head dim, so the
    scores are two half-width dots. Split 0 stores the token's new K/V into its page and adds
    it to its softmax (on the H100 a `where` over every K/V tile to swap it in cost 3-5% at long
    contexts). Programs past the sequences in use do nothing, except that with one split
    (outputs stored directly) a padding token's programs store its zero rows. meta_ref holds
    (sequences in use, splits used).

    With `fused_merge` (several splits), the partials are merged here rather than by XLA after
    the launch: each program stores its partial, then counts itself in its (token, head)'s
    counter; the one that arrives last reads every split's partial back and stores the row, and
    sets the counter back to zero for the next launch. The `num_working` programs of the grid
    come first; after them, one program per (token, head) stores the zero rows of padding
    tokens."""
    if fused_merge:
        counts_in_ref, out_ref, o_ref, lse_ref, kv_ref, counts_ref = refs
        del counts_in_ref  # the same buffer as counts_ref (aliased)
    else:
        o_ref, lse_ref, kv_ref = refs if num_splits > 1 else (refs[0], None, refs[1])
        out_ref = counts_ref = None
    del kv_in_ref  # the same buffer as kv_ref (aliased)
    num_seqs_max, pages_per_seq = pages_ref.shape
    head_dim = qkv_ref.shape[-1]
    rows_per_token = num_q_heads + 2 * num_kv_heads
    n, used_splits = meta_ref[0], (meta_ref[1] if num_splits > 1 else 1)
    program = pl.program_id(0)
    t = program // (num_kv_heads * used_splits)
    h = program // used_splits % num_kv_heads
    split = program % used_splits
    m_rows = decode_rows(_next_pow2(group))
    g = lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0)  # [M, 1]
    first_row = t * num_q_heads + h * group  # out as rows [T * Hq, D]
    q_row = t * rows_per_token + h * group
    k_row = t * rows_per_token + num_q_heads + h
    parts = ((0, head_dim // 2), (head_dim // 2, head_dim // 2)) if rope else ((0, head_dim),)

    @pl.when(t < n)
    def _():
        kv_len = kv_lens_ref[t]
        page_at = lambda col: jnp.clip(pages_ref[t, jnp.minimum(col, pages_per_seq - 1)], 0, num_pages - 1)
        q_parts = [plgpu.load(qkv_ref.at[pl.ds(q_row, m_rows), pl.ds(lo, width)],
                              mask=jnp.broadcast_to(g < group, (m_rows, width)), other=0.0)
                   for lo, width in parts]  # [M, width] each
        k_parts = [qkv_ref[k_row, pl.ds(lo, width)] for lo, width in parts]  # [width] each
        new_v = qkv_ref[k_row + num_kv_heads, :]  # [D]
        if rope:
            cos = [cos_ref[t, pl.ds(lo, width)] for lo, width in parts]
            sin = [sin_ref[t, pl.ds(lo, width)] for lo, width in parts]
            q_parts = _rotate_half(*q_parts, [c[None, :] for c in cos], [s[None, :] for s in sin])
            k_parts = _rotate_half(*k_parts, cos, sin)

        # The new K/V as the cache stores them (rounded, for an FP8 cache), so this step attends
        # to the same values as every later one.
        k_stored = [to_cache_dtype(part, kv_ref.dtype) for part in k_parts]
        v_stored = to_cache_dtype(new_v, kv_ref.dtype)

        @pl.when((split == 0) & (kv_len > 0))
        def _():
            page, row = page_at((kv_len - 1) // page_size), (kv_len - 1) % page_size
            for part, (lo, width) in zip(k_stored, parts):
                kv_ref[page, row, 2 * h, pl.ds(lo, width)] = part
            kv_ref[page, row, 2 * h + 1, :] = v_stored

        # The cache's first kv_len - 1 keys, then (split 0) the new one: the row being written
        # is never read, so no program depends on split 0's store.
        q_pos = kv_len - 1
        begin, num_iters = _split_range(q_pos, q_pos, split, used_splits, page_size=page_size,
                                        pages_per_iter=pages_per_iter, sliding_window=sliding_window)
        stats = _attend(q_parts, kv_ref, page_at, h, begin, num_iters, q_pos, q_pos,
                        page_size=page_size, pages_per_iter=pages_per_iter,
                        sliding_window=sliding_window, **attend)
        stats = _add_key(stats, q_parts, k_stored, v_stored, (split == 0) & (kv_len > 0),
                         sm_scale=attend["sm_scale"], soft_cap=attend["soft_cap"])
        out, lse = _finish(stats)
        mask = jnp.broadcast_to(g < group, out.shape)
        if lse_ref is None:  # one split: the output rows directly
            plgpu.store(o_ref.at[pl.ds(first_row, m_rows), :], out.astype(o_ref.dtype), mask=mask)
        else:
            base = ((t * num_splits + split) * num_kv_heads + h) * group  # [T, splits, Hkv, group] rows
            plgpu.store(o_ref.at[pl.ds(base, m_rows), :], out, mask=mask)
            plgpu.store(lse_ref.at[pl.ds(base, m_rows)], lse, mask=g[:, 0] < group)
        if fused_merge:
            # Every thread's stores are done (barrier) and released (the atomic is acq_rel at GPU
            # scope) before the count; the last arrival acquires them all. (Interpret mode runs
            # the programs one after another and has no barrier.)
            if not interpret:
                plgpu.debug_barrier()
            arrived = plgpu.atomic_add(counts_ref, t * num_kv_heads + h, jnp.int32(1))

            @pl.when(arrived == used_splits - 1)
            def _():
                if not interpret:
                    plgpu.debug_barrier()
                row = (t * num_splits * num_kv_heads + h) * group  # split 0's first row
                rows = _next_pow2(group)  # the group's rows only (the dot tile's padding is not stored)
                merged = _merge_partials(o_ref, lse_ref, row, num_kv_heads * group, used_splits, num_splits,
                                         rows, group)
                plgpu.store(out_ref.at[pl.ds(first_row, rows), :], merged.astype(out_ref.dtype),
                            mask=lax.broadcasted_iota(jnp.int32, merged.shape, 0) < group)
                counts_ref[t * num_kv_heads + h] = jnp.int32(0)

    if fused_merge:  # the zero rows of padding tokens, one program per (token, head)
        pad = program - num_working
        pad_t, pad_h = pad // num_kv_heads, pad % num_kv_heads

        @pl.when((pad >= 0) & (pad_t >= n) & (pad_t < num_tokens))
        def _():
            plgpu.store(out_ref.at[pl.ds(pad_t * num_q_heads + pad_h * group, m_rows), :],
                        jnp.zeros((m_rows, head_dim), out_ref.dtype),
                        mask=jnp.broadcast_to(g < group, (m_rows, head_dim)))
    elif lse_ref is None:
        @pl.when(t >= n)
        def _():
            plgpu.store(o_ref.at[pl.ds(first_row, m_rows), :], jnp.zeros((m_rows, head_dim), o_ref.dtype),
                        mask=jnp.broadcast_to(g < group, (m_rows, head_dim)))


def _merge_partials(o_ref, lse_ref, first_row, split_stride, used_splits, num_splits, m_rows, group):
    """The rows [m_rows, D] merged from `used_splits` (<= num_splits) partials (out and log-sum-exp)
    stored at rows first_row + s * split_stride, each weighted by exp(lse_s - max); splits
    without keys (lse -inf) weigh nothing. Every split's loads are issued at once (unrolled, the
    unused ones masked): a loop over the splits, each iteration waiting for its loads, made
    the kernel 2.5 us a layer slower at batch 1 on the H100, this 1.1 us. Other SMs wrote the partials, and another merge on this SM may have read the same
    cache lines before they were written: the loads are volatile, so L1 is not used."""
    head_dim = o_ref.shape[-1]
    keep = lax.broadcasted_iota(jnp.int32, (m_rows,), 0) < group
    lses, parts = [], []
    for s in range(num_splits):
        row, used = first_row + s * split_stride, s < used_splits
        lses.append(plgpu.load(lse_ref.at[pl.ds(row, m_rows)], mask=keep & used, other=-jnp.inf, volatile=True))
        parts.append(plgpu.load(o_ref.at[pl.ds(row, m_rows), :], other=0.0, volatile=True,
                                mask=jnp.broadcast_to((keep & used)[:, None], (m_rows, head_dim))))
    top = functools.reduce(jnp.maximum, lses)
    top = jnp.where(top > -jnp.inf, top, 0.0)
    weights = [jnp.exp(lse - top) for lse in lses]  # [M] each; 0 for unused splits
    total = functools.reduce(jnp.add, weights)
    acc = functools.reduce(jnp.add, [w[:, None] * part for w, part in zip(weights, parts)])
    return acc / jnp.where(total > 0, total, 1.0)[:, None]


def decode_only_attention(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, *, sm_scale,
                          sliding_window, soft_cap, pages_per_iter, num_splits, num_warps,
                          num_stages, interpret, rope=None, min_splits=None, counts=None):
    """The whole op for a batch whose every sequence has one query token, token i being sequence
    i's (cu_q_lens == arange): one launch that writes the new K/V and attends, plus XLA's split
    merge when the grid splits and `counts` is None. rope: None, or (cos, sin) [T, D] float32 tables with which the
    kernel rotates q and k first (rotate-half). Returns (out [T, Hq, D] in q.dtype, kv_pages).

    q, k and v go in as one [T * (Hq + 2 Hkv), D] array of rows: XLA merges the q/k/v
    projections into one matmul and fuses this concatenation into it (into its split-K
    reduction at batch 1), so no copy is made.

    counts: None, or int32 zeros [>= T * Hkv]: then a grid with several splits merges them in
    the kernel (`_decode_only_kernel`'s fused_merge), with no merge launches after it, and
    returns (out, kv_pages, counts), counts zeros again (thread them through every layer's
    call, so one buffer serves them all)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    m_rows = decode_rows(_next_pow2(group))
    pages_per_seq = page_indices.shape[1]
    keys = 32 if num_tokens * num_kv_heads >= NUM_SMS else 128  # as in the mixed op (gpu.py)
    pages_per_iter = pages_per_iter or max(1, min(keys // page_size, pages_per_seq))
    wave = wave_size(2 * pages_per_iter * page_size * head_dim * kv_pages.dtype.itemsize, num_stages)
    grid_splits = num_splits or num_splits_for(num_tokens, num_kv_heads, pages_per_seq, pages_per_iter, wave)
    min_splits = min_splits or min_splits_for(jax.devices()[0].device_kind)
    # The sequences in use and the splits they use, computed once for every layer's kernel.
    n = jnp.minimum(num_seqs[0], min(kv_lens.shape[0], num_tokens))
    longest = jnp.max(jnp.where(jnp.arange(kv_lens.shape[0]) < n, kv_lens, 0))
    if grid_splits == 1 or num_splits:
        used = grid_splits
    else:
        used = split_count(n, num_kv_heads, grid_splits, wave,
                           min_splits=jnp.where(longest >= MIN_SPLITS_KEYS, min_splits, 1))
    meta = jnp.stack([n, used]).astype(jnp.int32)  # [2]
    rows = num_tokens * num_q_heads
    qkv = jnp.concatenate([q.reshape(num_tokens, -1), k.reshape(num_tokens, -1),
                           v.reshape(num_tokens, -1)], axis=1)
    qkv = qkv.reshape(num_tokens * (num_q_heads + 2 * num_kv_heads), head_dim)
    # Only tiny shapes (tests) need spare rows for a tile to stay in bounds.
    qkv = jnp.pad(qkv, ((0, max(m_rows - qkv.shape[0], 0)), (0, 0)))
    if rope is None:
        cos = sin = jnp.zeros((1, head_dim), jnp.float32)  # not read
    else:
        cos, sin = (table.astype(jnp.float32) for table in rope)
    fused_merge = counts is not None and grid_splits > 1
    out_shape = []
    if fused_merge:
        if counts.dtype != jnp.int32 or counts.shape[0] < num_tokens * num_kv_heads:
            raise ValueError(f"counts must be int32 zeros of at least {num_tokens * num_kv_heads} "
                             f"entries, got {counts.dtype} {counts.shape}")
        out_shape.append(jax.ShapeDtypeStruct((max(rows, m_rows), head_dim), q.dtype))
    if grid_splits > 1:
        partial_rows = num_tokens * grid_splits * num_kv_heads * group
        # m_rows spare rows: the last program's masked tile stays in bounds.
        out_shape += [jax.ShapeDtypeStruct((partial_rows + m_rows, head_dim), jnp.float32),
                      jax.ShapeDtypeStruct((partial_rows + m_rows,), jnp.float32)]
    else:
        out_shape.append(jax.ShapeDtypeStruct((max(rows, m_rows), head_dim), q.dtype))
    num_working = decode_only_programs(num_tokens, page_indices.shape[0], num_kv_heads, grid_splits,
                                       num_splits, wave, min_splits)
    kernel = functools.partial(
        _decode_only_kernel, num_tokens=num_tokens, group=group, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, page_size=page_size, num_pages=num_pages,
        pages_per_iter=pages_per_iter, num_splits=grid_splits, sliding_window=sliding_window, rope=rope is not None, sm_scale=sm_scale, soft_cap=soft_cap,
        exact=q.dtype == jnp.float32, fused_merge=fused_merge, num_working=num_working,
        interpret=bool(interpret))
    whole = pl.BlockSpec()
    inputs = [meta, kv_lens, page_indices, qkv, cos, sin, kv_pages] + ([counts] if fused_merge else [])
    out_shape.append(jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype))
    aliases = {6: len(out_shape) - 1}
    if fused_merge:
        out_shape.append(jax.ShapeDtypeStruct(counts.shape, counts.dtype))
        aliases[7] = len(out_shape) - 1
    res = pl.pallas_call(
        kernel,
        grid=(num_working + (num_tokens * num_kv_heads if fused_merge else 0),),
        in_specs=[whole] * len(inputs),
        out_specs=[whole] * len(out_shape),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu_decode_only",
    )(*inputs)
    if fused_merge:
        out, _, _, kv_pages, counts = res
        return out[:rows].reshape(num_tokens, num_q_heads, head_dim), kv_pages, counts
    *res, kv_pages = res
    if grid_splits == 1:
        out = res[0][:rows].reshape(num_tokens, num_q_heads, head_dim)
        return (out, kv_pages) if counts is None else (out, kv_pages, counts)
    # Rows no program stored (padding tokens, splits past the ones used) are garbage: masked.
    stored = (jnp.arange(grid_splits)[None, :] < used) & (jnp.arange(num_tokens)[:, None] < n)  # [T, splits]
    out = res[0][:partial_rows].reshape(num_tokens, grid_splits, num_kv_heads, group, head_dim)
    lse = res[1][:partial_rows].reshape(num_tokens, grid_splits, num_kv_heads, group)
    out = jnp.where(stored[:, :, None, None, None], out, 0.0)
    lse = jnp.where(stored[:, :, None, None], lse, -jnp.inf)
    return merge_splits(out, lse).reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_pages
