"""The decode path of the GPU kernel: one query token per sequence, split-KV (flash-decoding).

A decode step reads every cached page of every sequence once and does little arithmetic with it,
so it is bound by HBM bandwidth, and what matters is keeping enough loads in flight on every SM:
- Grid (slot, kv head, split). A slot is one decode sequence; the group's q heads are folded
  into the M dimension of one tile (M = max(16, group padded to a power of two) rows: Triton's
  smallest dot), so K and V of a kv head are read once for the whole group.
- When slots x kv heads is too small to fill the GPU, each sequence's pages are cut into
  contiguous ranges, one per program; each writes a float32 partial output and its log-sum-exp,
  and a small jnp step merges the splits. The grid has room for `num_splits` ranges; how many
  are used is data (`split_count`), from the number of slots that hold a sequence, so a batch-1
  step in a 16-slot bucket splits like a 1-slot grid (the spare programs read nothing).
- Each loop iteration visits `pages_per_iter` pages (unrolled; default 32 keys when slots x kv
  heads fill the SMs, else 128), and `num_stages` asks Triton's software pipeliner to prefetch
  the next iteration's pages while this one computes (2 vs 3 stages, 4 vs 8 warps: within noise
  on the H100; 256 keys per iteration was 15-30% slower than 128; in an 8B decode step 32 keys
  beat 128 by 22% at batch 32 and 5% at 256 but lost 10% at batch 1, and 16 keys lost
  everywhere). Numbers: benchmarks/results/gpu_kernel_bench_h100.md, decode_profile_h100.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NUM_SMS = 132  # H100 SXM; only used to size the split count


def decode_rows(group_pad: int) -> int:
    """Rows of the q tile: the padded group, at least 16 (Triton's smallest dot)."""
    return max(16, group_pad)


MAX_SPLIT_PROGRAMS = 8 * NUM_SMS  # the most programs a grid gets for splits the data may not use
MAX_SPLITS = 32


def num_splits_for(num_slots: int, num_kv_heads: int, pages_per_seq: int, pages_per_iter: int) -> int:
    """The grid's split axis: about two waves over the SMs when every slot is used, and room for
    as many as one sequence alone would use (`split_count`) while the grid stays small. Never
    more splits than page groups."""
    programs = num_slots * num_kv_heads
    full = -(-2 * NUM_SMS // programs)
    alone = min(-(-2 * NUM_SMS // num_kv_heads), MAX_SPLIT_PROGRAMS // programs)
    return max(1, min(max(full, alone), -(-pages_per_seq // pages_per_iter), MAX_SPLITS))


def split_count(num_used, num_kv_heads: int, num_splits: int):
    """Splits the step uses (traced): about two waves over the SMs for the slots in use (as
    `num_splits_for` sizes a full grid), at most the grid's `num_splits`."""
    programs = jnp.maximum(num_used, 1) * num_kv_heads
    return jnp.clip(-(-2 * NUM_SMS // programs), 1, num_splits).astype(jnp.int32)


def _decode_kernel(meta_ref, pages_ref, q_ref, kv_ref, o_ref, lse_ref, *, sm_scale, sliding_window,
                   soft_cap, group_pad, page_size, pages_per_seq, pages_per_iter, num_splits, num_kv_heads, exact):
    slot, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq, tok, kv_len, used_splits = meta_ref[slot, 0], meta_ref[slot, 1], meta_ref[slot, 2], meta_ref[slot, 3]
    m_rows = decode_rows(group_pad)
    q = q_ref[h, pl.ds(tok * group_pad, m_rows), :]  # [M, D] rows past the group are ignored
    head_dim = q.shape[-1]

    num_pages = (kv_len + page_size - 1) // page_size
    first_page = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0) // page_size
    span = num_pages - first_page
    # Whole iterations per split, so only the last split has a partial one (masked by kv_len);
    # splits past `used_splits` start past the end and read nothing.
    per_split = (span + used_splits - 1) // used_splits
    per_split = (per_split + pages_per_iter - 1) // pages_per_iter * pages_per_iter
    begin = first_page + split * per_split
    end = jnp.minimum(begin + per_split, num_pages)
    num_iters = jnp.maximum(end - begin + pages_per_iter - 1, 0) // pages_per_iter
    q_pos = kv_len - 1

    def page_step(col, stats):
        m, l, acc = stats
        page = pages_ref[seq * pages_per_seq + jnp.minimum(col, pages_per_seq - 1)]
        k = kv_ref[page, :, 2 * h, :]  # [P, D]
        v = kv_ref[page, :, 2 * h + 1, :]  # [P, D]
        s = plgpu.dot(q, k, trans_b=True, allow_tf32=not exact) * sm_scale  # [M, P]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        key_pos = col * page_size + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)  # [1, P]
        ok = key_pos <= q_pos
        if sliding_window is not None:
            ok &= q_pos - key_pos < sliding_window
        s = jnp.where(ok, s, -jnp.inf)
        key_in = lax.broadcasted_iota(jnp.int32, (page_size, 1), 0) + col * page_size < kv_len  # [P, 1]
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
    m, l, acc = lax.fori_loop(0, num_iters, body, stats)
    has = l > 0
    out = acc / jnp.where(has, l, 1.0)[:, None]  # [M, D]
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)  # [M]
    base = ((slot * num_splits + split) * num_kv_heads + h) * group_pad  # [S, splits, Hkv, Gp] rows
    rows = lax.broadcasted_iota(jnp.int32, (m_rows,), 0)
    keep = rows < group_pad
    plgpu.store(o_ref.at[pl.ds(base, m_rows), :], out,
             mask=jnp.broadcast_to(keep[:, None], (m_rows, head_dim)))
    plgpu.store(lse_ref.at[pl.ds(base, m_rows)], lse, mask=keep)


def decode_attention(qh, kv_pages, pages_flat, slot_meta, *, num_slots, pages_per_seq, group_pad,
                     sm_scale, sliding_window, soft_cap, pages_per_iter, num_splits, num_warps,
                     num_stages, interpret):
    """Attention of every decode slot: returns [num_slots, Hkv, group_pad, D] float32.

    qh [Hkv, rows, D] holds the q heads of each token's group at rows tok*group_pad + g (padded
    with enough rows that a tile of decode_rows() rows never runs off the end); slot_meta [S, 4]
    is (sequence, token, kv_len, splits used) per slot, kv_len 0 for unused slots; splits used is
    the same in every row, at most `num_splits`.
    """
    num_kv_heads, _, head_dim = qh.shape
    page_size = kv_pages.shape[1]
    m_rows = decode_rows(group_pad)
    partial_rows = num_slots * num_splits * num_kv_heads * group_pad
    kernel = functools.partial(
        _decode_kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        group_pad=group_pad, page_size=page_size, pages_per_seq=pages_per_seq,
        pages_per_iter=pages_per_iter, num_splits=num_splits, num_kv_heads=num_kv_heads, exact=qh.dtype == jnp.float32)
    whole = pl.BlockSpec()
    out, lse = pl.pallas_call(
        kernel,
        grid=(num_slots, num_kv_heads, num_splits),
        in_specs=[whole, whole, whole, whole],
        out_specs=[whole, whole],
        # m_rows spare rows: the last program's masked tile stays in bounds.
        out_shape=[jax.ShapeDtypeStruct((partial_rows + m_rows, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((partial_rows + m_rows,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu_decode",
    )(slot_meta, pages_flat, qh, kv_pages)
    out = out[:partial_rows].reshape(num_slots, num_splits, num_kv_heads, group_pad, head_dim)
    lse = lse[:partial_rows].reshape(num_slots, num_splits, num_kv_heads, group_pad)
    if num_splits == 1:
        return out[:, 0]
    # Merge the splits: weights exp(lse_s - max), splits without keys have lse -inf (weight 0).
    top = lse.max(axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)  # [S, splits, Hkv, Gp]
    total = w.sum(axis=1)
    merged = jnp.einsum("sphg,sphgd->shgd", w, out)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]
