"""Ragged paged attention for NVIDIA GPUs: a Pallas kernel lowered through Pallas' Triton backend.

Same contract and cache layout as `pallas_kernels.reference.ragged_paged_attention_reference`:
one call serves a ragged batch of T query rows (decodes, prefill chunks, padding), first writing
the new K/V of every real token into its page, then attending causally over each sequence's pages.

First slice, deliberately simple:
- The K/V write is the reference's XLA scatter (`.at[].set(mode="drop")`), not yet fused.
- Query tokens are cut, in jnp outside the kernel, into blocks of `q_block_size` rows of ONE
  sequence; each block carries its metadata (sequence, number of rows, first row's position,
  KV length). Blocks are padded to a static count; padding blocks have 0 rows and a KV trip
  count of 0, so they do no KV work.
- Grid (query block, kv head). For GQA the block's q rows for the kv head's group of q heads are
  folded into the M dimension of the dots: M = q_block_size * group (token-major).
- The kernel loops (dynamic trip count up to the block's causal limit, from the sliding window's
  start) over KV blocks of `pages_per_kv_block` pages; each page's K and V are loaded through the
  page table with dynamic offsets and folded into a float32 online softmax. Scores beyond the
  causal limit/length are masked with `jnp.where` and V beyond the length is zeroed, so NaN in
  recycled pages never reaches an output.
- The output is written per block into a padded [blocks, Hkv, M, D] buffer and gathered back to
  tokens in jnp, so padded rows can never clobber other tokens.
Compiled (Triton) needs power-of-two block dims: M, page_size, head_dim. Dots fall back to a
broadcast-multiply-sum when a dim is below 16 (Triton's minimum dot size), e.g. decode with one
token per block and a small group.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference import _token_layout, _validate, _write_new_kv


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate_blocks(q, kv_pages, q_block_size, pages_per_kv_block, interpret) -> None:
    if q_block_size < 1 or pages_per_kv_block < 1:
        raise ValueError(f"q_block_size={q_block_size} and pages_per_kv_block={pages_per_kv_block} must be >= 1")
    if interpret:
        return
    group = q.shape[1] // (kv_pages.shape[2] // 2)
    dims = dict(rows=q_block_size * group, page_size=kv_pages.shape[1], head_dim=q.shape[2])
    bad = {name: n for name, n in dims.items() if not _is_pow2(n)}
    if bad:
        raise ValueError(f"the Triton lowering needs power-of-two block dims, got {bad}")


def _mm(a, b, *, trans_b: bool, exact: bool):
    """a [M, K] @ b ([N, K] if trans_b else [K, N]) -> [M, N] float32."""
    if min(a.shape + b.shape) >= 16:
        return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=not exact)
    b = b if trans_b else b.T  # [N, K]
    return jnp.sum(a[:, None, :].astype(jnp.float32) * b[None, :, :].astype(jnp.float32), axis=-1)


def _block_metadata(cu, q_lens, kv_lens, num_seqs, num_tokens, bq, num_blocks):
    """Per query block: (seq, first token, rows, first row's position, kv_len); per token: its
    block and row. Padding blocks have 0 rows."""
    num_seqs_max = kv_lens.shape[0]
    real = jnp.arange(num_seqs_max) < num_seqs[0]  # [S]
    blocks = jnp.where(real, -(-q_lens // bq), 0)  # [S]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks).astype(jnp.int32)])  # [S+1]
    b = jnp.arange(num_blocks, dtype=jnp.int32)  # [NB]
    seq = jnp.clip(jnp.searchsorted(cu_blocks, b, side="right") - 1, 0, num_seqs_max - 1)  # [NB]
    first = (b - cu_blocks[seq]) * bq  # [NB] first row among the sequence's queries
    rows = jnp.where(b < cu_blocks[-1], jnp.clip(q_lens[seq] - first, 0, bq), 0)  # [NB]
    pos0 = kv_lens[seq] - q_lens[seq] + first  # [NB]
    meta = jnp.stack([seq, rows, pos0, jnp.where(rows > 0, kv_lens[seq], 0)], axis=1)  # [NB, 4]
    start = cu[seq] + first  # [NB] first token
    # Token -> (block, row): block rows beyond `rows` point at a dummy token T (dropped).
    tok = jnp.where(jnp.arange(bq)[None, :] < rows[:, None], start[:, None] + jnp.arange(bq), num_tokens)  # [NB, bq]
    return meta.astype(jnp.int32), tok


def _kernel(meta_ref, pages_ref, q_ref, kv_ref, o_ref, *, sm_scale, sliding_window, soft_cap,
            group, page_size, pages_per_seq, pages_per_kv_block, exact):
    b, h = pl.program_id(0), pl.program_id(1)
    seq, rows, pos0, kv_len = meta_ref[b, 0], meta_ref[b, 1], meta_ref[b, 2], meta_ref[b, 3]
    m_rows, head_dim = q_ref.shape
    q = q_ref[...]  # [M, D]
    r = lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0) // group  # [M, 1] token row of each M row
    q_pos = pos0 + r  # [M, 1]
    row_ok = r < rows  # [M, 1]
    chunk = page_size * pages_per_kv_block
    last = pos0 + rows - 1  # causal limit of the block's last row
    num_chunks = jnp.where(rows > 0, (last + chunk) // chunk, 0)
    first_chunk = 0 if sliding_window is None else jnp.minimum(jnp.maximum(pos0 - sliding_window + 1, 0) // chunk, num_chunks)

    def page_step(col, stats):
        m, l, acc = stats
        page = pages_ref[seq * pages_per_seq + jnp.minimum(col, pages_per_seq - 1)]
        k = kv_ref[page, :, 2 * h, :]  # [P, D]
        v = kv_ref[page, :, 2 * h + 1, :]  # [P, D]
        key_pos = col * page_size + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)  # [1, P]
        s = _mm(q, k, trans_b=True, exact=exact) * sm_scale  # [M, P]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        ok = (key_pos <= q_pos) & row_ok  # [M, P]
        if sliding_window is not None:
            ok &= q_pos - key_pos < sliding_window
        s = jnp.where(ok, s, -jnp.inf)
        key_in = lax.broadcasted_iota(jnp.int32, (page_size, 1), 0) + col * page_size < kv_len  # [P, 1]
        v = jnp.where(key_in, v, jnp.zeros_like(v))
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [M]
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])  # [M, P]
        alpha = jnp.exp(m - m_safe)  # [M]
        pv = _mm(p.astype(v.dtype), v, trans_b=False, exact=exact)  # [M, D]
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    def chunk_body(c, stats):
        for i in range(pages_per_kv_block):  # unrolled: one online-softmax step per page
            stats = page_step(c * pages_per_kv_block + i, stats)
        return stats

    stats = (jnp.full((m_rows,), -jnp.inf, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
             jnp.zeros((m_rows, head_dim), jnp.float32))
    _, l, acc = lax.fori_loop(first_chunk, num_chunks, chunk_body, stats)
    o_ref[...] = (acc / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


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
    pages_per_kv_block: int = 4,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
):
    """Writes k/v into kv_pages, then attends; returns (out [T, Hq, D] in q.dtype, new kv_pages).

    Same contract as the reference; the keyword arguments are static (jit-compatible as a plain
    function). Use q_block_size=1 for decode-only batches (one token per block).
    """
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    _validate_blocks(q, kv_pages, q_block_size, pages_per_kv_block, interpret)
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads, group = two_hkv // 2, num_q_heads // (two_hkv // 2)
    num_seqs_max, pages_per_seq = page_indices.shape
    bq = q_block_size
    m_rows = bq * group
    # Each sequence wastes at most one partial block.
    num_blocks = -(-num_tokens // bq) + min(num_seqs_max, num_tokens)

    cu, q_lens, tok_seq, _, tok_pos, tok_valid = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_pages = _write_new_kv(kv_pages, k, v, page_indices, tok_seq, tok_pos, tok_valid)
    meta, tok = _block_metadata(cu, q_lens, kv_lens, num_seqs, num_tokens, bq, num_blocks)

    q_pad = jnp.pad(q, ((0, 1), (0, 0), (0, 0)))  # [T+1, Hq, D] row T is the dummy token
    qb = q_pad[tok].reshape(num_blocks, bq, num_kv_heads, group, head_dim)  # [NB, bq, Hkv, G, D]
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(num_blocks, num_kv_heads, m_rows, head_dim)  # [NB, Hkv, M, D]
    pages_flat = jnp.clip(page_indices, 0, num_pages - 1).reshape(-1).astype(jnp.int32)  # [S*pages_per_seq]

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, group=group,
        page_size=page_size, pages_per_seq=pages_per_seq, pages_per_kv_block=pages_per_kv_block,
        exact=q.dtype == jnp.float32)
    whole = pl.BlockSpec()  # the whole array; the kernel indexes it itself
    block = pl.BlockSpec((None, None, m_rows, head_dim), lambda b, h: (b, h, 0, 0))
    out_b = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads),
        in_specs=[whole, whole, block, whole],
        out_specs=block,
        out_shape=jax.ShapeDtypeStruct((num_blocks, num_kv_heads, m_rows, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(meta, pages_flat, qb, kv_pages)  # [NB, Hkv, M, D]

    # Back to tokens: scatter each block row to its token (dummy rows to T, dropped).
    out_b = out_b.reshape(num_blocks, num_kv_heads, bq, group, head_dim).transpose(0, 2, 1, 3, 4)
    out_b = out_b.reshape(num_blocks * bq, num_q_heads, head_dim)  # [NB*bq, Hq, D]
    out = jnp.zeros((num_tokens, num_q_heads, head_dim), q.dtype).at[tok.reshape(-1)].set(out_b, mode="drop")
    return out, kv_pages
