"""The decode path of the GPU kernel in official Triton, called from JAX through jax_triton.

The second GPU approach of issue 3, next to Pallas' Triton lowering (`gpu_decode.py`); the op in
`gpu.py` picks one with `decode_impl=`. Same contract: every sequence with one query token gets
causal attention over its pages, written into that token's output row; other rows are left as
they are. What differs is how little runs around the kernel, since small decode batches are
dominated by fixed per-op costs rather than by bytes:
- The kernel reads the raw metadata (`num_seqs`, `cu_q_lens`, `kv_lens`, `page_indices`) and q
  in its native [T, Hq, D] layout, so no jnp op builds slots, q tiles or page lists for it.
- Grid (sequence, kv head, split): a program whose sequence is padding or a prefill does no work.
  The kv head's group of q heads forms the M rows of one tile (max(16, group padded to a power of
  two): Triton's smallest dot), so K and V are read once per group. Each loop iteration gathers
  `block_n` keys through the page table (one page id per key, cached in L1, loaded an iteration
  ahead so that Triton's pipeliner multi-buffers the K/V loads).
- Output rows are written in place into the op's output (aliased input -> output), so no scatter.
- When sequences x kv heads would leave SMs idle, each sequence's keys are cut into `num_splits`
  ranges (flash-decoding). merge="fused": every program stores its partial output and
  log-sum-exp, then bumps a per-(sequence, head) counter (zeroed by jax_triton before launch);
  the program that arrives last merges the splits and writes the row, so one launch does all.
  merge="kernel": a second small launch merges instead (no atomics), kept as the fallback.
Recycled pages may hold NaN: K and V loads beyond a sequence's length are masked (never read),
and scores there are -inf.

On CPU the kernels run in Triton's interpreter (`interpret_call`, same calling convention as
`jax_triton.triton_call`, via `jax.pure_callback` on torch CPU tensors); the interpreter has no
bf16 matmul, so there bf16 tiles are upcast to float32 before the dots (`dot_fp32=True`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

NUM_SMS = 132  # H100 SXM; only used to size the split count


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # exp overflow -> 1, underflow -> -1


@triton.jit
def _merge_splits(o_part_ptr, lse_part_ptr, out_ptr, part, tok, h, is_decode,
                  NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Online merge of the splits' (output, lse) of one (sequence, kv head) into its output rows.
    part: index of split 0 among the partials, laid out [S, Hkv, splits, GROUP_PAD(, D)]."""
    rows = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    ok = (rows < GROUP) & is_decode
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for s in range(NUM_SPLITS):
        row_idx = (part + s) * GROUP_PAD + rows  # [GP]
        # .cg: other SMs wrote these; read them from L2, never from a stale L1 line.
        lse = tl.load(lse_part_ptr + row_idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(o_part_ptr + row_idx[:, None].to(tl.int64) * HEAD_DIM + d[None, :], mask=ok[:, None],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        a = tl.exp(m - m_safe)
        b = tl.exp(lse - m_safe)  # splits without keys have lse -inf: weight 0
        l = a * l + b
        acc = a[:, None] * acc + b[:, None] * o
        m = m_new
    res = acc / tl.where(l > 0, l, 1.0)[:, None]
    dst = (tok * NUM_Q_HEADS + h * GROUP + rows)[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    tl.store(out_ptr + dst, res.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, kv_lens_ptr, page_indices_ptr, cu_q_lens_ptr, num_seqs_ptr, out_in_ptr,
    out_ptr, o_part_ptr, lse_part_ptr, count_ptr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES_PER_SEQ: tl.constexpr, NUM_PAGES: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, FUSED_MERGE: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # out_in_ptr and out_ptr are one buffer (aliased); writes go through out_ptr.
    seq = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)

    # Padding sequences (seq >= num_seqs) have garbage cu_q_lens: test seq first.
    n = tl.load(num_seqs_ptr)
    safe_seq = tl.where(seq < n, seq, 0)
    q_len = tl.load(cu_q_lens_ptr + safe_seq + 1) - tl.load(cu_q_lens_ptr + safe_seq)
    is_decode = (seq < n) & (q_len == 1)
    tok = tl.where(is_decode, tl.load(cu_q_lens_ptr + safe_seq), 0)
    kv_len = tl.where(is_decode, tl.load(kv_lens_ptr + safe_seq), 0)

    rows = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    row_ok = rows < GROUP
    q_rows = (tok * NUM_Q_HEADS + h * GROUP + rows)[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_rows, mask=row_ok[:, None] & is_decode, other=0.0)  # [ROWS, D]
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys [first_key, kv_len): page-aligned start after the window; whole iterations per split.
    first_key = 0
    if WINDOW > 0:
        first_key = tl.maximum(kv_len - WINDOW, 0) // PAGE_SIZE * PAGE_SIZE
    total_iters = tl.cdiv(kv_len - first_key, BLOCK_N)
    per_split = tl.cdiv(total_iters, NUM_SPLITS)
    it_begin = split * per_split
    it_end = tl.minimum(it_begin + per_split, total_iters)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    row_stride: tl.constexpr = 2 * NUM_KV_HEADS * HEAD_DIM
    table = page_indices_ptr + safe_seq * PAGES_PER_SEQ
    keys = first_key + it_begin * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    pages = tl.load(table + tl.minimum(keys // PAGE_SIZE, PAGES_PER_SEQ - 1), mask=keys < kv_len, other=0)
    for it in range(it_begin, it_end):
        # The next iteration's page ids are loaded one iteration ahead: K/V addresses then do not
        # wait on a load of the same iteration, and Triton's pipeliner gives K/V num_stages - 1
        # buffers (with the page-id load inside the loop it kept one, serialising load and math).
        keys = first_key + it * BLOCK_N + tl.arange(0, BLOCK_N)
        key_in = keys < kv_len
        page = tl.minimum(tl.maximum(pages, 0), NUM_PAGES - 1)
        next_keys = keys + BLOCK_N
        pages = tl.load(table + tl.minimum(next_keys // PAGE_SIZE, PAGES_PER_SEQ - 1), mask=next_keys < kv_len, other=0)
        base = (page.to(tl.int64) * PAGE_SIZE + keys % PAGE_SIZE) * row_stride + 2 * h * HEAD_DIM  # [BN]
        k = tl.load(kv_ptr + base[:, None] + d[None, :], mask=key_in[:, None], other=0.0)  # [BN, D]
        v = tl.load(kv_ptr + base[:, None] + HEAD_DIM + d[None, :], mask=key_in[:, None], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SM_SCALE  # [ROWS, BN]
        if SOFT_CAP > 0:
            s = SOFT_CAP * _tanh(s / SOFT_CAP)
        ok = key_in  # the query sits at kv_len - 1: causal = inside the length
        if WINDOW > 0:
            ok = ok & (keys > kv_len - 1 - WINDOW)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = alpha * l + tl.sum(p, axis=1)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    head_rows = tok * NUM_Q_HEADS + h * GROUP + rows  # [ROWS]
    if NUM_SPLITS == 1:
        res = acc / tl.where(l > 0, l, 1.0)[:, None]
        dst = head_rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
        tl.store(out_ptr + dst, res.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & is_decode)
    else:
        part = (seq * NUM_KV_HEADS + h) * NUM_SPLITS  # split 0 of this (sequence, head)
        has = l > 0
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        res = acc / tl.where(has, l, 1.0)[:, None]
        keep = (rows < GROUP_PAD) & is_decode
        row_idx = (part + split) * GROUP_PAD + rows
        tl.store(lse_part_ptr + row_idx, lse, mask=keep)
        tl.store(o_part_ptr + row_idx[:, None].to(tl.int64) * HEAD_DIM + d[None, :], res, mask=keep[:, None])
        if FUSED_MERGE:
            # Every thread's stores are done (barrier) and released (acq_rel) before the count;
            # the last arrival acquires them all and merges.
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + seq * NUM_KV_HEADS + h, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                tl.debug_barrier()
                _merge_splits(o_part_ptr, lse_part_ptr, out_ptr, part, tok, h, is_decode, NUM_Q_HEADS,
                              GROUP, GROUP_PAD, HEAD_DIM, NUM_SPLITS)


@triton.jit
def _merge_kernel(cu_q_lens_ptr, num_seqs_ptr, o_part_ptr, lse_part_ptr, out_in_ptr, out_ptr,
                  NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(num_seqs_ptr)
    safe_seq = tl.where(seq < n, seq, 0)
    start = tl.load(cu_q_lens_ptr + safe_seq)
    is_decode = (seq < n) & (tl.load(cu_q_lens_ptr + safe_seq + 1) - start == 1)
    tok = tl.where(is_decode, start, 0)
    _merge_splits(o_part_ptr, lse_part_ptr, out_ptr, (seq * NUM_KV_HEADS + h) * NUM_SPLITS, tok, h, is_decode,
                  NUM_Q_HEADS, GROUP, GROUP_PAD, HEAD_DIM, NUM_SPLITS)


# ---- host side ------------------------------------------------------------------------------

DEFAULTS = dict(block_n=None, num_splits=None, merge="fused", num_warps=4, num_stages=3)


def default_block_n(head_dim: int, itemsize: int) -> int:
    """Keys per loop iteration: a 16 KiB K tile (64 keys of bf16 x 128), 16 to 128 keys. With 3
    stages K and V are double-buffered: 70 KiB of shared memory, 3 programs per H100 SM."""
    return max(16, min(128, 16384 // (head_dim * itemsize)))


def num_splits_for(num_seqs_max: int, num_kv_heads: int, max_iters: int) -> int:
    """Enough programs for about four per SM (three fit at once with the default tiles, so the
    last wave is not mostly idle), never more splits than iterations; splits are cheap: one
    partial row per program and the merge in the last one."""
    want = -(-4 * NUM_SMS // (num_seqs_max * num_kv_heads))
    return max(1, min(want, max_iters, 32))


def supports(page_size: int, head_dim: int) -> bool:
    """Triton needs power-of-two tile dims; pages of any power-of-two size >= 1 are gathered."""
    return head_dim >= 16 and head_dim == _next_pow2(head_dim) and page_size == _next_pow2(page_size)


def check_options(*, merge="fused", block_n=None, num_splits=None, **_):
    if merge not in ("fused", "kernel"):
        raise ValueError(f"merge must be 'fused' or 'kernel', got {merge!r}")
    if block_n is not None and (block_n < 16 or block_n != _next_pow2(block_n)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")


def decode_attention_triton(
    out,  # [T, num_q_heads, head_dim] the op's output; decode rows are written into it
    q,  # [T, num_q_heads, head_dim]
    kv_pages,  # [num_pages, page_size, 2*num_kv_heads, head_dim] (new K/V already written)
    kv_lens,  # [S] int32
    page_indices,  # [S, pages_per_seq] int32
    cu_q_lens,  # [S+1] int32
    num_seqs,  # [1] int32
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    merge: str = "fused",
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
):
    """Returns `out` with the row of every decode token (sequence with q_len 1) replaced by its
    attention output; other rows unchanged. Static keyword arguments; jit-compatible."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads = two_hkv // 2
    num_seqs_max, pages_per_seq = page_indices.shape
    check_options(merge=merge, block_n=block_n, num_splits=num_splits)
    if not supports(page_size, head_dim):
        raise ValueError(f"the Triton decode kernel needs power-of-two page_size and head_dim >= 16, "
                         f"got page_size={page_size}, head_dim={head_dim}")
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must match q ({q.shape}, {q.dtype}), got {out.shape}, {out.dtype}")
    dot_fp32 = interpret and q.dtype != jnp.float32  # the interpreter has no bf16 matmul
    block_n = block_n or default_block_n(head_dim, 4 if dot_fp32 else q.dtype.itemsize)
    max_iters = -(-pages_per_seq * page_size // block_n)
    num_splits = num_splits or num_splits_for(num_seqs_max, num_kv_heads, max_iters)
    group = num_q_heads // num_kv_heads
    group_pad = _next_pow2(group)
    fused = merge == "fused" and num_splits > 1
    call = interpret_call if interpret else _jax_triton_call()

    parts = num_seqs_max * num_kv_heads * num_splits * group_pad if num_splits > 1 else 1
    meta = (kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32),
            num_seqs.astype(jnp.int32))
    shapes = dict(NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad,
                  HEAD_DIM=head_dim)
    out, o_part, lse_part, _ = call(
        q, kv_pages, *meta, out,
        kernel=_decode_kernel,
        out_shape=[jax.ShapeDtypeStruct(out.shape, out.dtype),
                   jax.ShapeDtypeStruct((parts, head_dim), jnp.float32),  # [S, Hkv, splits, Gp] rows
                   jax.ShapeDtypeStruct((parts,), jnp.float32),
                   jax.ShapeDtypeStruct((num_seqs_max * num_kv_heads if fused else 1,), jnp.int32)],
        grid=(num_seqs_max, num_kv_heads, num_splits),
        input_output_aliases={6: 0},
        zeroed_outputs=(3,) if fused else (),
        num_warps=num_warps, num_stages=num_stages, name="ragged_paged_attention_triton_decode",
        SM_SCALE=float(sm_scale), SOFT_CAP=float(soft_cap or 0.0), WINDOW=int(sliding_window or 0),
        ROWS=max(16, group_pad), PAGE_SIZE=page_size, PAGES_PER_SEQ=pages_per_seq, NUM_PAGES=num_pages,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, FUSED_MERGE=fused, DOT_FP32=dot_fp32,
        PRECISION="ieee" if q.dtype == jnp.float32 else "tf32", **shapes)
    if num_splits == 1 or fused:
        return out
    (out,) = call(
        meta[2], meta[3], o_part, lse_part, out,
        kernel=_merge_kernel,
        out_shape=[jax.ShapeDtypeStruct(out.shape, out.dtype)],
        grid=(num_seqs_max, num_kv_heads),
        input_output_aliases={4: 0}, num_warps=4, num_stages=1,
        name="ragged_paged_attention_triton_merge", NUM_SPLITS=num_splits, **shapes)
    return out


def _jax_triton_call():
    # Imported here: jax_triton needs a CUDA jaxlib at import time, and CPU runs never call it.
    import jax_triton

    return jax_triton.triton_call


# ---- interpreter (CPU) ----------------------------------------------------------------------

def _to_torch(a):
    import torch

    a = np.array(a)  # writable copy
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t, dtype):
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)
    return t.numpy()


def _run_interpreted(kernel, grid, args, metaparams):
    from triton.runtime.interpreter import InterpretedFunction

    # Nested @triton.jit functions (ours and triton.language's own, e.g. tl.sum) are only
    # interpretable when triton.jit made them under TRITON_INTERPRET=1.
    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("interpret=True needs TRITON_INTERPRET=1 in the environment before triton is imported")
    _fix_interpreter_index()
    kernel[grid](*args, **metaparams)


@functools.cache
def _fix_interpreter_index():
    """Triton 3.6's interpreter holds scalars as 1-element arrays and turns them into loop bounds
    with int(array), which numpy >= 2.4 refuses for arrays that are not 0-d: use .item()."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def interpret_call(*args, kernel, out_shape, grid, input_output_aliases=None, zeroed_outputs=(), num_warps=None,
                   num_stages=None, name="", **metaparams):
    """`jax_triton.triton_call`'s calling convention, run by Triton's interpreter on torch CPU
    tensors inside `jax.pure_callback`: array args then outputs are the kernel's pointer args,
    metaparams its constexprs; an aliased output is its input's buffer; zeroed outputs start at
    0, the others hold garbage (NaN / -7), so a kernel reading what it never wrote shows up."""
    del num_warps, num_stages, name
    aliases = {o: i for i, o in (input_output_aliases or {}).items()}

    def host(*arrays):
        import torch

        tensors = [_to_torch(a) for a in arrays]
        outs = []
        for j, shape in enumerate(out_shape):
            if j in aliases:
                outs.append(tensors[aliases[j]])
                continue
            t = torch.zeros(shape.shape, dtype=_to_torch(np.zeros(0, shape.dtype)).dtype)
            if j not in zeroed_outputs:
                t.fill_(float("nan") if t.is_floating_point() else -7)
            outs.append(t)
        _run_interpreted(kernel, grid, [*tensors, *outs], metaparams)
        return [_to_numpy(t, s.dtype) for t, s in zip(outs, out_shape)]

    return jax.pure_callback(host, list(out_shape), *args)
