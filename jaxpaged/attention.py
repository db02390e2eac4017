"""Attention backends, chosen once and explicitly.

`reference` is the pure-jnp op over the page table (any device; the oracle). `pallas` is the Pallas
kernel (TPU Mosaic / NVIDIA GPU). `auto` resolves from the platform.
"""

import functools

from pallas_kernels import get_kv_cache_shape, ragged_paged_attention_reference
from jaxpaged.step_inputs import AttentionMetadata


def resolve_backend(name: str, platform: str) -> str:
    if name == "auto":
        # The Pallas kernels are not part of this build yet; every platform uses the reference.
        return "reference"
    if name == "pallas":
        raise ValueError(
            "attention_backend='pallas' is not available in this build: the Pallas kernels are "
            "still being written; use 'reference' (or 'auto')"
        )
    return name


def make_attention(name: str, *, platform: str, sm_scale: float, sliding_window: int | None):
    """Returns attention(q, k, v, kv_pages, metadata) -> (out, kv_pages) for the chosen backend."""
    backend = resolve_backend(name, platform)
    assert backend == "reference"
    op = functools.partial(ragged_paged_attention_reference, sm_scale=sm_scale,
                           sliding_window=sliding_window)

    def attention(q, k, v, kv_pages, metadata: AttentionMetadata):
        return op(q, k, v, kv_pages, metadata.kv_lens, metadata.page_indices, metadata.cu_q_lens,
                  metadata.num_seqs)

    return attention


__all__ = ["get_kv_cache_shape", "make_attention", "resolve_backend"]
