"""Ragged paged attention in pure jnp: the oracle for the Pallas kernels and the CPU backend.

One call serves a whole ragged batch: decode tokens, prefill chunks and padding, all packed into
T query rows. Sequence i owns the query rows q[cu_q_lens[i]:cu_q_lens[i+1]], which are the LAST
q_len positions of a sequence that is kv_lens[i] long after this step. The op first writes the
new K/V of every real token into its page, then runs causal attention over each sequence's pages.

Cache layout (owned here, see `get_kv_cache_shape`): [num_pages, page_size, 2 * num_kv_heads,
head_dim] with K of kv-head h at index 2h and V at 2h + 1.

The computation is blocked so it stays cheap under `jax.jit` with static shapes: queries are cut
into blocks of `q_block_size` rows that never straddle two sequences, and KV is visited chunk by
chunk in a `lax.while_loop` whose trip count follows the longest real sequence, with an online
softmax in float32. Recycled pages may hold NaN: scores beyond a sequence's length are masked
with `jnp.where` and V there is zeroed, so 0 * NaN never reaches an output.
"""

import jax
import jax.numpy as jnp
from jax import lax


def get_kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of `kv_pages`: K and V interleaved along axis 2 (K of head h at 2h, V at 2h + 1)."""
    return (num_pages, page_size, 2 * num_kv_heads, head_dim)


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
    seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, num_seqs_max - 1)  # [T]
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
    return kv_pages.at[page, pos % page_size].set(new_kv.astype(kv_pages.dtype), mode="drop")


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
    kv_chunk_size: int = 128,
    q_block_size: int = 16,
):
    """Writes k/v into kv_pages, then attends; returns (out [T, Hq, D] in q.dtype, new kv_pages).

    jit-compatible as a plain function (the engine calls it inside its own jit); the keyword
    arguments are static. `ragged_paged_attention_reference_jit` is a jitted convenience.
    """
    _validate(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_pages, page_size = kv_pages.shape[:2]
    num_seqs_max, pages_per_seq = page_indices.shape
    bq = q_block_size
    chunk_pages = max(1, -(-kv_chunk_size // page_size))  # whole pages per KV chunk
    chunk = chunk_pages * page_size

    # 1. Scatter the new K/V into their pages.
    cu, q_lens, tok_seq, tok_j, tok_pos, tok_valid = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)
    kv_pages = _write_new_kv(kv_pages, k, v, page_indices, tok_seq, tok_pos, tok_valid)

    # 2. Query blocks: each holds up to bq rows of one sequence. sum(ceil(q_len / bq)) <= T // bq + S.
    num_blocks = num_tokens // bq + num_seqs_max
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(-(-q_lens // bq))]).astype(jnp.int32)  # [S+1]
    b = jnp.arange(num_blocks, dtype=jnp.int32)  # [NB]
    blk_seq = jnp.clip(jnp.searchsorted(cu_blocks, b, side="right") - 1, 0, num_seqs_max - 1)  # [NB]
    blk_first = (b - cu_blocks[blk_seq]) * bq  # [NB] first row's index among the sequence's queries
    blk_rows = jnp.where(b < cu_blocks[-1], jnp.clip(q_lens[blk_seq] - blk_first, 0, bq), 0)  # [NB]
    r = jnp.arange(bq, dtype=jnp.int32)  # [Bq]
    row_valid = r[None, :] < blk_rows[:, None]  # [NB, Bq]
    row_tok = jnp.clip(cu[blk_seq][:, None] + blk_first[:, None] + r[None, :], 0, num_tokens - 1)  # [NB, Bq]
    blk_kv_len = jnp.where(blk_rows > 0, kv_lens[blk_seq], 0)  # [NB]
    q_pos = (blk_kv_len - q_lens[blk_seq] + blk_first)[:, None] + r[None, :]  # [NB, Bq]
    q_blocks = q[row_tok].astype(jnp.float32)  # [NB, Bq, Hq, D]
    q_blocks = q_blocks.reshape(num_blocks, bq, num_kv_heads, group, head_dim)  # [NB, Bq, Hkv, G, D]
    blk_pages = jnp.clip(page_indices[blk_seq], 0, num_pages - 1)  # [NB, pages_per_seq]

    # 3. Online softmax over KV chunks; trip count follows the longest real sequence.
    num_chunks = (jnp.max(blk_kv_len) + chunk - 1) // chunk

    def body(carry):
        c, m, l, acc = carry
        slots = jnp.clip(c * chunk_pages + jnp.arange(chunk_pages), 0, pages_per_seq - 1)  # [cp]
        kv = kv_pages[blk_pages[:, slots]]  # [NB, cp, page_size, 2*Hkv, D]
        kv = kv.reshape(num_blocks, chunk, 2 * num_kv_heads, head_dim).astype(jnp.float32)  # [NB, C, 2*Hkv, D]
        key_pos = c * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [C]
        in_len = key_pos[None, :] < blk_kv_len[:, None]  # [NB, C]
        kc = kv[:, :, 0::2]  # [NB, C, Hkv, D]
        vc = jnp.where(in_len[:, :, None, None], kv[:, :, 1::2], 0.0)  # [NB, C, Hkv, D]
        s = jnp.einsum("brhgd,bchd->brhgc", q_blocks, kc) * sm_scale  # [NB, Bq, Hkv, G, C]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = in_len[:, None, :] & row_valid[:, :, None] & (key_pos[None, None, :] <= q_pos[:, :, None])  # [NB, Bq, C]
        if sliding_window is not None:
            mask &= q_pos[:, :, None] - key_pos[None, None, :] < sliding_window
        s = jnp.where(mask[:, :, None, None, :], s, -jnp.inf)  # [NB, Bq, Hkv, G, C]
        m_new = jnp.maximum(m, s.max(axis=-1))  # [NB, Bq, Hkv, G]
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked rows: exp(-inf - 0) = 0
        p = jnp.exp(s - m_safe[..., None])  # [NB, Bq, Hkv, G, C]
        alpha = jnp.exp(m - m_safe)  # [NB, Bq, Hkv, G]
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("brhgc,bchd->brhgd", p, vc)  # [NB, Bq, Hkv, G, D]
        return c + 1, m_new, l, acc

    stats_shape = (num_blocks, bq, num_kv_heads, group)
    init = (
        jnp.int32(0),
        jnp.full(stats_shape, -jnp.inf, jnp.float32),
        jnp.zeros(stats_shape, jnp.float32),
        jnp.zeros(stats_shape + (head_dim,), jnp.float32),
    )
    _, _, l, acc = lax.while_loop(lambda carry: carry[0] < num_chunks, body, init)

    # 4. Normalise and map blocks back to tokens; padding tokens and empty rows give zeros.
    out_blocks = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [NB, Bq, Hkv, G, D]
    out_blocks = out_blocks.reshape(num_blocks, bq, num_q_heads, head_dim)  # [NB, Bq, Hq, D]
    tok_blk = jnp.clip(cu_blocks[tok_seq] + tok_j // bq, 0, num_blocks - 1)  # [T]
    out = out_blocks[tok_blk, jnp.clip(tok_j, 0) % bq]  # [T, Hq, D]
    out = jnp.where(tok_valid[:, None, None], out, 0.0)
    return out.astype(q.dtype), kv_pages


ragged_paged_attention_reference_jit = jax.jit(
    ragged_paged_attention_reference,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_chunk_size", "q_block_size"),
)
