"""First-chunk prefill attention on NVIDIA GPUs through cuDNN's fused flash attention.

A prefill chunk that starts at position 0 (a prompt's first chunk with no cached prefix: every
prompt of an offline batch that fits the token budget) attends only to its own keys, all of them
in the step's new k/v. Those chunks go to cuDNN as one packed ("THD") batch: the step's q, k and
v as they are, [1, T, heads, D], each chunk a segment given by its first token and length, causal
within the segment. Tokens outside the segments (decode rows, continuation chunks, padding) are
ignored by cuDNN and computed by the Pallas kernels (`gpu.py`), which still read every key from
the paged cache.

On the H100 (benchmarks/results/h100_session20.md), Llama-3-8B heads, bf16: 8 x 1024 tokens in
0.236 ms (292 TFLOP/s) and 1 x 2048 in 0.121 ms (283), against the Pallas prefill kernel's 0.202
ms (170 TFLOP/s) for 1 x 2048. Inside the whole op the gain mostly goes (session 21, H100: 8 x
1024 0.475 against 0.489 ms with the Pallas kernel alone, 8 x 512 0.245 against 0.211), and the
8B offline run was not faster with it, so the engine takes this path only when asked
(`jaxpaged.attention.CUDNN_PREFILL`, `JAXPAGED_CUDNN_PREFILL=1`). Its GPU tests (the op against
the reference, and the engine) pass on the H100.

The packed layout is reached through jax's cuDNN module (`jax._src.cudnn`), not a public API:
`available()` is False where it is missing or differs, and the Pallas kernel serves every
prefill then. Before jax 0.11 the packed layout scaled the KV offsets by the query head count,
wrong under grouped-query attention, so it needs jax >= 0.11. cuDNN takes 16-bit inputs only:
float32 queries stay on the Pallas kernel, as does a logit soft cap (cuDNN has none).
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.reference import to_cache_dtype

MIN_JAX = (0, 11)


@functools.cache
def available() -> bool:
    """Whether this process can run cuDNN's packed attention: jax >= 0.11, its cuDNN module, and
    a CUDA GPU of compute capability 9.0 (Hopper) or later (the packed layout needs it)."""
    if jax.__version_info__[:2] < MIN_JAX:
        return False
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        devices = jax.devices()
        if devices[0].platform != "gpu" or cudnn.check_cudnn_version() < 90500:
            return False
        return all(tuple(int(x) for x in d.compute_capability.split(".")) >= (9, 0) for d in devices)
    except Exception:  # no cuDNN module, no CUDA backend, or another jax's internals
        return False


def supports(q_dtype, head_dim: int, soft_cap) -> bool:
    """Whether cuDNN takes these queries: 16-bit, head_dim a multiple of 8 up to 256, no soft cap."""
    return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 256 and soft_cap is None)


def first_chunk_attention(q, k, v, starts, lens, *, sm_scale: float, sliding_window: int | None,
                          cache_dtype):
    """Causal attention within each segment of the packed step: q [T, Hq, D], k/v [T, Hkv, D];
    starts/lens [S] int32, a segment's first token and length, -1 for slots that are not one.
    Returns [T, Hq, D] in q's dtype; rows outside every segment are undefined.

    Keys and values are first rounded as `cache_dtype` stores them (an FP8 cache), so these
    queries see the values every later step reads from the cache."""
    if jnp.dtype(cache_dtype) != q.dtype:
        k, v = (to_cache_dtype(x, cache_dtype).astype(q.dtype) for x in (k, v))
    return packed_causal_attention(q, k, v, starts, lens, sm_scale=sm_scale,
                                   sliding_window=sliding_window)


def packed_causal_attention(q, k, v, starts, lens, *, sm_scale: float, sliding_window: int | None):
    """The cuDNN call of `first_chunk_attention` (same arguments, keys as attended)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    # The slot axis gets one spare "-1" entry: with a single slot the packed path would not be
    # taken (jax switches to it on more than one segment per batch).
    none = jnp.full((1,), -1, jnp.int32)
    lens = jnp.concatenate([lens, none])[None]  # [1, S + 1]
    offsets = jnp.concatenate([starts, none, none])[None]  # [1, S + 2]
    out = cudnn.dot_product_attention(
        q[None], k[None], v[None], q_seqlen=lens, kv_seqlen=lens, q_offsets=offsets,
        kv_offsets=offsets, scale=sm_scale, mask_type=cudnn.MaskType.CAUSAL, qkv_layout="BTNH",
        sliding_window_length=sliding_window)
    return out[0]
