"""Attention backends, chosen once and explicitly.

`reference` is the pure-jnp op over the page table (any device; the oracle). `pallas` is the Pallas
kernel of the platform: on TPU `pallas_kernels.tpu` (Mosaic), on NVIDIA GPUs `pallas_kernels.gpu`
(Triton lowering), on CPU the GPU kernel in interpret mode (slow; it exists so the engine's Pallas
path can be tested without an accelerator). `auto` resolves from the platform.
"""

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference
from jaxpaged.config import ATTENTION_BACKENDS
from jaxpaged.models.layers import apply_rope
from jaxpaged.step_inputs import AttentionMetadata


# The GPU decode-only kernel merges a split sequence's partials in the same launch (the last split
# to finish merges; `gpu_decode.decode_only_attention`); False: XLA merges them after the kernel
# (two more launches a layer), kept for comparisons (the benchmarks' --xla-split-merge).
FUSED_SPLIT_MERGE = True

# On NVIDIA GPUs, prompts' first chunks can attend through cuDNN's fused attention where this jax
# and GPU offer it (`pallas_kernels.cudnn_prefill`). Off by default (`JAXPAGED_CUDNN_PREFILL=1`, or
# the benchmarks' --cudnn-prefill, turns it on): it passes its GPU tests, but on the H100 it did
# not make the 8B offline run faster (3,598 against 3,683 output tok/s in one lease) and the op
# only matched the Pallas prefill kernel (8 x 1024: 0.475 against 0.489 ms; 8 x 512: 0.245
# against 0.211), while it reaches into jax's private cuDNN module
# (benchmarks/results/h100_session21.md).
CUDNN_PREFILL = os.environ.get("JAXPAGED_CUDNN_PREFILL", "0") == "1"


def resolve_backend(name: str, platform: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name == "auto":
        # CPU: the reference (interpret mode is a correctness tool, far slower). GPU: the kernel
        # beat the reference on every decode and prefill shape measured on the H100, and end to
        # end a Llama-3.1-8B decode step (batch 32, 1k context) took 13.7 ms vs 33.2 ms
        # (benchmarks/results/gpu_kernel_bench_h100.md). TPU: the Mosaic kernel.
        return "pallas" if platform in ("gpu", "tpu") else "reference"
    return name


def _gpu_prefill_impl() -> str:
    """The compiled GPU op's path for prompts' first chunks: "cudnn" where `CUDNN_PREFILL` is on
    and this jax and GPU offer it, else "pallas"."""
    from pallas_kernels import cudnn_prefill

    return "cudnn" if CUDNN_PREFILL and cudnn_prefill.available() else "pallas"


def first_chunk_backend(name: str, platform: str) -> str:
    """What attends prompts' first chunks under backend `name`: "cudnn", or the backend itself."""
    backend = resolve_backend(name, platform)
    return _gpu_prefill_impl() if (backend, platform) == ("pallas", "gpu") else backend


def _pallas_op(platform: str):
    if platform == "tpu":
        # Imported only here: the TPU kernel needs the Mosaic TPU lowering.
        from pallas_kernels.tpu import ragged_paged_attention_tpu

        return functools.partial(ragged_paged_attention_tpu, interpret=False)
    from pallas_kernels.gpu import ragged_paged_attention_gpu

    if platform == "gpu":
        return functools.partial(ragged_paged_attention_gpu, interpret=False, prefill_impl=_gpu_prefill_impl())
    # Interpret mode: one page per decode loop step, since unrolled pages only multiply compile time.
    return functools.partial(ragged_paged_attention_gpu, interpret=True, decode=dict(pages_per_iter=1))


def has_decode_only(name: str, platform: str) -> bool:
    """Whether the backend has a specialisation for decode-only steps (the GPU kernel, also in
    interpret mode): then the runner compiles a decode program for the buckets such steps use."""
    return resolve_backend(name, platform) == "pallas" and platform != "tpu"


def make_attention(name: str, *, platform: str, sm_scale: float, sliding_window: int | None,
                   decode_only: bool = False):
    """Returns attention(q, k, v, kv_pages, metadata, rope, counts) -> (out, kv_pages, counts) for
    the chosen backend: q [T, Hq, D], k/v [T, Hkv, D], rope (cos, sin) [T, D] each or None. q and
    k arrive unrotated; the rotary embedding is applied here, or, in the GPU decode-only kernel,
    inside the kernel (which then reads q/k/v as rows of one concatenated array). `counts` is
    that kernel's split counters (it merges split sequences in the same launch; see
    `gpu_decode.decode_only_attention`): pass None to the first layer and each layer's returned
    counts to the next, so one zeroed buffer serves a whole step; other backends return None.

    decode_only: the function only ever sees steps whose every sequence has one query token
    (`has_decode_only` says whether the backend does anything different then)."""
    backend = resolve_backend(name, platform)
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window)
    reference = functools.partial(ragged_paged_attention_reference, **common)
    fused_rope = False
    if backend == "reference":
        op = reference
    elif decode_only and has_decode_only(name, platform):
        op = functools.partial(_pallas_op(platform), decode_only=True, **common)
        fused_rope = True
    else:
        op = functools.partial(_pallas_op(platform), **common)

    # One jitted function for every layer: inside the model's jit, each layer's call then reuses
    # the first one's trace and lowering (a nested jit is traced once per shape and emitted once
    # per module, and XLA inlines it). Unwrapped, the kernels were traced and lowered to Triton IR
    # again for each of the 32 layers of an 8B model: ~9 s per token bucket on this CPU.
    @jax.jit
    def layer_attention(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, rope, counts):
        chosen, in_kernel = op, fused_rope
        if name == "auto" and platform == "gpu":
            from pallas_kernels.gpu import compiled_supports

            # The Triton kernel needs power-of-two page_size >= 16 and head_dim; "auto" falls
            # back to the reference for other geometries ("pallas" raises a clear ValueError).
            if not compiled_supports(kv_pages.shape[1], kv_pages.shape[3]):
                chosen, in_kernel = reference, False
        if rope is not None and in_kernel:
            if not FUSED_SPLIT_MERGE:
                return (*chosen(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, rope=rope), counts)
            if counts is None:  # the first layer: one counter per token and KV head, zeroed
                counts = jnp.zeros(q.shape[0] * k.shape[1], jnp.int32)
            return chosen(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, rope=rope,
                          counts=counts)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return (*chosen(q, k, v, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs), counts)

    def attention(q, k, v, kv_pages, metadata: AttentionMetadata, rope=None, counts=None):
        return layer_attention(q, k, v, kv_pages, metadata.kv_lens, metadata.page_indices,
                               metadata.cu_q_lens, metadata.num_seqs, rope, counts)

    return attention


__all__ = ["first_chunk_backend", "get_kv_cache_shape", "has_decode_only", "make_attention", "resolve_backend"]
