"""Ragged paged attention in pure jnp: the oracle for the Pallas kernels and the CPU backend.

One call serves a whole ragged batch: decode tokens, prefill chunks and padding, all packed into
T query rows. Sequence i owns the query rows q[cu_q_lens[i]:cu_q_lens[i+1]], which are the LAST
q_len positions of a sequence that is kv_lens[i] long after this step. The op first writes the
new K/V of every real token into its page, then runs causal attention over each sequence's pages.

Cache layout (owned here, see `get_kv_cache_shape`): [num_pages, page_size, 2 * num_kv_heads,
head_dim] with K of kv-head h at index 2h and V at 2h + 1. The cache may be stored in an FP8
dtype (the engine's kv_cache_dtype="fp8"): new K/V are rounded into it with `to_cache_dtype`
(saturating, no scale) and read back in float32, so every backend attends to the stored values.

The computation stays cheap under `jax.jit` with static shapes, because every loop runs only as
far as the real data: sequences with one query token (decodes) are handled together, one slot
per sequence, in a `lax.while_loop` over KV chunks up to the longest of them; sequences with
several query tokens (prefill chunks) are cut into blocks of `q_block_size` rows, and a
`lax.fori_loop` over the real blocks visits each block's KV chunks only up to its causal limit.
Softmax is online, in float32. Recycled pages may hold NaN: scores beyond a sequence's length are
masked with `jnp.where` and V there is zeroed, so 0 * NaN never reaches an output.
"""

import jax
import jax.numpy as jnp
from jax import lax


def get_kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of `kv_pages`: K and V interleaved along axis 2 (K of head h at 2h, V at 2h + 1)."""
    return (num_pages, page_size, 2 * num_kv_heads, head_dim)


def to_cache_dtype(x, dtype):
    """x rounded to the cache's dtype. FP8 saturates at its largest finite value (±448 for e4m3,
    whose cast of anything larger is NaN), as vLLM's FP8 cache does; there is no scale (vLLM's
    default of 1.0, which assumes the model's keys and values stay inside that range)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    return x.astype(dtype)


def _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape != (num_tokens, num_kv_heads, head_dim):
        raise ValueError(f"k and v must be [{num_tokens}, num_kv_heads, {head_dim}], got {k.shape}, {v.shape}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if kv_pages.ndim != 4 or kv_pages.shape[2:] != (2 * num_kv_heads, head_dim):
        raise ValueError(f"kv_pages must be [num_pages, page_size, {2 * num_kv_heads}, {head_dim}], got {kv_pages.shape}")
    num_seqs_max = kv_lens.shape[0]
    if page_indices.ndim != 2 or page_indices.shape[0] != num_seqs_max:
        raise ValueError(f"page_indices must be [{num_seqs_max}, pages_per_seq], got {page_indices.shape}")
    if cu_q_lens.shape != (num_seqs_max + 1,) or num_seqs.shape != (1,):
        raise ValueError(f"cu_q_lens must be [{num_seqs_max + 1}] and num_seqs [1], got {cu_q_lens.shape}, {num_seqs.shape}")


def _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens):
    """Per token: its sequence, index within the sequence's queries, position, and validity."""
    num_seqs_max = kv_lens.shape[0]
    n = num_seqs[0]
    # Padding sequences get q_len 0 whatever their cu_q_lens entries hold.
    cu = jnp.where(jnp.arange(num_seqs_max + 1) <= n, cu_q_lens, cu_q_lens[n])  # [S+1]
    q_lens = cu[1:] - cu[:-1]  # [S]
    t = jnp.arange(num_tokens, dtype=jnp.int32)  # [T]
    # side="right" skips sequences with q_len 0 (they share their start offset with the next one).
    # compare_all: one [T, S+1] comparison, no while loop (on GPU a loop's every iteration can
    # wait on the host for its condition).
    seq = jnp.clip(jnp.searchsorted(cu, t, side="right", method="compare_all") - 1, 0, num_seqs_max - 1)  # [T]
    valid = t < cu[n]  # [T]
    j = t - cu[seq]  # [T] index among the sequence's queries
    pos = kv_lens[seq] - q_lens[seq] + j  # [T]
    return cu, q_lens, seq, j, pos, valid


def _write_new_kv(kv_pages, k, v, page_indices, seq, pos, valid):
    num_pages, page_size = kv_pages.shape[:2]
    pages_per_seq = page_indices.shape[1]
    slot = jnp.clip(pos // page_size, 0, pages_per_seq - 1)  # [T]
    # Padding tokens aim at page `num_pages`, which mode="drop" discards.
    page = jnp.where(valid, page_indices[seq, slot], num_pages)  # [T]
    new_kv = jnp.stack([k, v], axis=2).reshape(k.shape[0], -1, k.shape[2])  # [T, 2*Hkv, D]
    return kv_pages.at[page, pos % page_size].set(to_cache_dtype(new_kv, kv_pages.dtype), mode="drop")


def _online_softmax_step(carry, s, v):
    """One flash-attention update. s [..., C] masked scores (-inf), v [..., C, D] (zeros where masked)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked rows: exp(-inf - 0) = 0
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + jnp.einsum("...c,...cd->...d", p, v)


def _init_stats(shape, head_dim):
    return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))


def _scores(q, kc, sm_scale, soft_cap):
    """q [..., Hkv, G, D] x kc [..., C, Hkv, D] -> [..., Hkv, G, C] (GQA without repeating K)."""
    s = jnp.einsum("...hgd,...chd->...hgc", q, kc) * sm_scale
    return soft_cap * jnp.tanh(s / soft_cap) if soft_cap is not None else s


def _decode_part(out, q, kv_pages, kv_lens, page_indices, cu, q_lens, num_seqs, *, sm_scale,
                 sliding_window, soft_cap, chunk_pages):
    """Sequences with one query token, vectorised: one slot per sequence, no wasted query rows."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads, pages_per_seq = two_hkv // 2, page_indices.shape[1]
    num_seqs_max = kv_lens.shape[0]
    slots = min(num_seqs_max, num_tokens)
    chunk = chunk_pages * page_size

    seq_ids = jnp.arange(num_seqs_max, dtype=jnp.int32)
    is_decode = (q_lens == 1) & (seq_ids < num_seqs[0])  # [S]
    rank = jnp.cumsum(is_decode) - 1  # [S]
    slot_seq = jnp.zeros(slots, jnp.int32).at[jnp.where(is_decode, rank, slots)].set(seq_ids, mode="drop")
    slot_valid = jnp.arange(slots) < jnp.sum(is_decode)  # [slots]
    slot_tok = jnp.where(slot_valid, cu[slot_seq], num_tokens)  # [slots], T = dropped on write
    slot_len = jnp.where(slot_valid, kv_lens[slot_seq], 0)  # [slots]
    q_pos = slot_len - 1  # [slots]
    qd = q[jnp.clip(slot_tok, 0, num_tokens - 1)].astype(jnp.float32)  # [slots, Hq, D]
    qd = qd.reshape(slots, num_kv_heads, num_q_heads // num_kv_heads, head_dim)  # [slots, Hkv, G, D]
    slot_pages = jnp.clip(page_indices[slot_seq], 0, num_pages - 1)  # [slots, pages_per_seq]

    def body(carry):
        c, stats = carry
        cols = jnp.clip(c * chunk_pages + jnp.arange(chunk_pages), 0, pages_per_seq - 1)  # [cp]
        kv = kv_pages[slot_pages[:, cols]].reshape(slots, chunk, two_hkv, head_dim)  # [slots, C, 2Hkv, D]
        kv = kv.astype(jnp.float32)
        key_pos = c * chunk + jnp.arange(chunk)  # [C]
        valid = key_pos[None, :] <= q_pos[:, None]  # [slots, C] (causal = within the length)
        if sliding_window is not None:
            valid &= q_pos[:, None] - key_pos[None, :] < sliding_window
        s = _scores(qd, kv[:, :, 0::2], sm_scale, soft_cap)  # [slots, Hkv, G, C]
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        v = jnp.where(valid[:, :, None, None], kv[:, :, 1::2], 0.0)  # [slots, C, Hkv, D]
        v = jnp.swapaxes(v, 1, 2)[:, :, None]  # [slots, Hkv, 1, C, D]
        return c + 1, _online_softmax_step(stats, s, v)

    num_chunks = (jnp.max(slot_len) + chunk - 1) // chunk
    stats = _init_stats((slots, num_kv_heads, num_q_heads // num_kv_heads), head_dim)
    _, (_, l, acc) = lax.while_loop(lambda carry: carry[0] < num_chunks, body, (jnp.int32(0), stats))
    res = (acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(slots, num_q_heads, head_dim)
    return out.at[slot_tok].set(res, mode="drop")


def _prefill_part(out, q, kv_pages, kv_lens, page_indices, cu, q_lens, num_seqs, *, sm_scale,
                  sliding_window, soft_cap, chunk_pages, block_rows):
    """Sequences with several query tokens: a loop over their real query blocks (bq rows of one
    sequence each), each visiting KV chunks only up to its last row's causal limit."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads, pages_per_seq = two_hkv // 2, page_indices.shape[1]
    group = num_q_heads // num_kv_heads
    num_seqs_max = kv_lens.shape[0]
    bq, chunk = block_rows, chunk_pages * page_size

    is_prefill = (q_lens > 1) & (jnp.arange(num_seqs_max) < num_seqs[0])  # [S]
    blocks = jnp.where(is_prefill, -(-q_lens // bq), 0)  # [S]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks)]).astype(jnp.int32)  # [S+1]
    # Padded by bq rows so every block's rows can be sliced without going out of bounds.
    q_padded = jnp.pad(q, ((0, bq), (0, 0), (0, 0))).astype(jnp.float32)  # [T+bq, Hq, D]
    out = jnp.pad(out, ((0, bq), (0, 0), (0, 0)))  # [T+bq, Hq, D]
    rows = jnp.arange(bq)

    def block(b, out):
        seq = jnp.searchsorted(cu_blocks, b, side="right") - 1
        first = (b - cu_blocks[seq]) * bq  # first row's index among the sequence's queries
        num_rows = jnp.minimum(q_lens[seq] - first, bq)
        start = cu[seq] + first  # its first token
        q_pos = kv_lens[seq] - q_lens[seq] + first + rows  # [bq]
        row_valid = rows < num_rows  # [bq]
        qb = lax.dynamic_slice_in_dim(q_padded, start, bq)  # [bq, Hq, D]
        qb = qb.reshape(bq, num_kv_heads, group, head_dim)  # [bq, Hkv, G, D]
        pages = jnp.clip(page_indices[seq], 0, num_pages - 1)  # [pages_per_seq]
        last = q_pos[0] + num_rows - 1  # causal limit of the block's last row
        first_chunk = 0 if sliding_window is None else jnp.maximum(q_pos[0] - sliding_window + 1, 0) // chunk

        def chunk_body(carry):
            c, stats = carry
            cols = jnp.clip(c * chunk_pages + jnp.arange(chunk_pages), 0, pages_per_seq - 1)
            kv = kv_pages[pages[cols]].reshape(chunk, two_hkv, head_dim).astype(jnp.float32)  # [C, 2Hkv, D]
            key_pos = c * chunk + jnp.arange(chunk)  # [C]
            valid = (key_pos[None, :] <= q_pos[:, None]) & row_valid[:, None]  # [bq, C]
            if sliding_window is not None:
                valid &= q_pos[:, None] - key_pos[None, :] < sliding_window
            s = _scores(qb, kv[None, :, 0::2], sm_scale, soft_cap)  # [bq, Hkv, G, C]
            s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
            in_len = key_pos <= last  # [C]
            v = jnp.where(in_len[:, None, None], kv[:, 1::2], 0.0)  # [C, Hkv, D]
            v = jnp.swapaxes(v, 0, 1)[None, :, None]  # [1, Hkv, 1, C, D]
            return c + 1, _online_softmax_step(stats, s, v)

        stats = _init_stats((bq, num_kv_heads, group), head_dim)
        _, (_, l, acc) = lax.while_loop(lambda carry: carry[0] * chunk <= last, chunk_body,
                                        (jnp.int32(first_chunk), stats))
        res = (acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(bq, num_q_heads, head_dim)
        # Rows past the block's end belong to other sequences: keep what is there.
        current = lax.dynamic_slice_in_dim(out, start, bq)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(row_valid[:, None, None], res, current),
                                               start, axis=0)

    out = lax.fori_loop(0, cu_blocks[-1], block, out)
    return out[:num_tokens]


@jax.named_scope("ragged_paged_attention_reference")
def ragged_paged_attention_reference(
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
    kv_chunk_size: int = 64,
    q_block_size: int = 32,
):
    """Writes k/v into kv_pages, then attends; returns (out [T, Hq, D] in q.dtype, new kv_pages).

    Decode sequences (one query token) are handled together, one slot each; prefill sequences by
    a loop over their query blocks of `q_block_size` rows. KV is visited in chunks of
    `kv_chunk_size` positions (rounded to whole pages). jit-compatible as a plain function (the
    engine calls it inside its own jit); the keyword arguments are static.
    """
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    page_size = kv_pages.shape[1]
    chunk_pages = max(1, -(-kv_chunk_size // page_size))

    cu, q_lens, tok_seq, _, tok_pos, tok_valid = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_pages = _write_new_kv(kv_pages, k, v, page_indices, tok_seq, tok_pos, tok_valid)

    out = jnp.zeros((num_tokens, num_q_heads, head_dim), jnp.float32)  # padding tokens stay 0
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  chunk_pages=chunk_pages)
    args = (q, kv_pages, kv_lens, page_indices, cu, q_lens, num_seqs)
    out = _decode_part(out, *args, **common)
    out = _prefill_part(out, *args, block_rows=q_block_size, **common)
    return out.astype(q.dtype), kv_pages


ragged_paged_attention_reference_jit = jax.jit(
    ragged_paged_attention_reference,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_chunk_size", "q_block_size"),
)
