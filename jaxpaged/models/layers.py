"""Layers shared by every model family: RMSNorm, rotary embeddings, the SwiGLU MLP."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.models.quant import Fp8Ops, Fp8Product, Fp8Rows, fp8_swiglu_mlp, linear


def rms_norm(x, weight, eps: float):
    """RMSNorm computed in float32, as Hugging Face does, then cast back."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with linear or Llama-3 scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions, inv_freq: np.ndarray):
    """cos and sin tables [T, head_dim] for the given positions [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [T, D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates x [T, H, D] by the half-split (GPT-NeoX / Hugging Face) convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, None, :] + rotated.astype(jnp.float32) * sin[:, None, :]
    return out.astype(x.dtype)


def add_rms_norm(x, delta, weight, eps: float, *, quantize: bool, ops: Fp8Ops):
    """The residual add and the norm after it: returns (x + delta, RMSNorm of that).

    x [T, D] is the residual stream; delta what a block adds to it (None before the first
    layer, an array, or an output projection's raw `Fp8Product`). With `quantize` (the next
    GEMM takes e4m3 rows) the normed rows come back as `Fp8Rows`, in one op after an FP8
    projection (`ops.add_rms_norm`)."""
    if quantize and isinstance(delta, Fp8Product):
        x, h, h_scale = ops.add_rms_norm(x, delta.raw, delta.x_scale, delta.w_scale, weight, eps=eps)
        return x, Fp8Rows(h, h_scale, x.dtype)
    x = add(x, delta)
    h = rms_norm(x, weight, eps)
    return x, (Fp8Rows(*ops.quantize(h), x.dtype) if quantize else h)


def add(x, delta):
    """x + delta, for any delta `add_rms_norm` takes."""
    if delta is None:
        return x
    return x + (delta.scaled() if isinstance(delta, Fp8Product) else delta)


def swiglu_mlp(h, gate_up_proj, down_proj, ops: Fp8Ops):
    """h [T, D] (or `Fp8Rows`); gate_up_proj [D, 2, F] (gate, up); down_proj [F, D] (or their fp8
    forms). Returns [T, D], or on e4m3 rows the down GEMM's raw `Fp8Product`."""
    if isinstance(h, Fp8Rows):
        return fp8_swiglu_mlp(h, gate_up_proj, down_proj, ops)
    gate_up = linear(h, gate_up_proj)  # [T, 2, F]: one matmul for both halves
    return linear(jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1], down_proj)
