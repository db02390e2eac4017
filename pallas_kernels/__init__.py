"""Ragged paged attention: cache layout, pure-jnp reference (the oracle and CPU backend)."""

from pallas_kernels.reference import (
    get_kv_cache_shape,
    ragged_paged_attention_reference,
    ragged_paged_attention_reference_jit,
)

__all__ = ["get_kv_cache_shape", "ragged_paged_attention_reference", "ragged_paged_attention_reference_jit"]
