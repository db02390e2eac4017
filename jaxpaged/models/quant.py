"""FP8 (e4m3) weights and activations for the linear layers: vLLM's `--quantization fp8`.

A bf16 (or float32) checkpoint is quantized when it loads, as vLLM does for an unquantized model:
- each weight per output channel: scale = max |w| over the input axis / 448, stored as e4m3
  with its input axis last ([*out, in]: the "TN" layout NVIDIA's FP8 GEMMs read without a
  transpose), with a float32 scale per output channel;
- each activation per token, in the step (dynamic): scale = max |x| over the row / 448.

`linear` then multiplies e4m3 by e4m3 and applies both scales to the output, where XLA fuses
them into the ops that read it (rope, the residual add, SiLU x up); in small (decode) buckets it
keeps activations in the model dtype (FP8_ACTIVATION_MIN_ROWS). Per-token scales keep a
sequence's outputs independent of what else is in its batch, though not of its bucket. Quantized: q/k/v, o, gate/up and
down of every layer; the embedding, the LM head and the norms stay in the model dtype.
"""

import jax
import jax.numpy as jnp

from jaxpaged.config import QUANTIZATIONS

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
QUANTIZED_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# Buckets below this many rows multiply bf16 activations by the e4m3 weights converted inside
# XLA's GEMM fusion (decode is bound by weight bytes, which that halves); from here up, e4m3 x
# e4m3 on cuBLASLt (prefill is bound by arithmetic, which that doubles). The 8B forward on an
# H200 (ms; benchmarks/results/h200_session13.md), weight-only vs activations quantized: batch 1
# 3.32 vs 4.09, 32: 4.91 vs 5.47, 64: 6.87 vs 7.06, 256: 17.27 vs 14.29 (bf16: 4.42 at 1, 5.83
# at 32). 128 rows was not timed.
FP8_ACTIVATION_MIN_ROWS = 128
_TINY = 1e-12  # the scale floor: an all-zero row or channel (padding) quantizes to zeros


def quantized_axes(logical_axes: tuple) -> dict:
    """Logical axes of a quantized leaf, from its unquantized [in, *out] axes."""
    return {"weight": logical_axes[1:] + logical_axes[:1], "scale": logical_axes[1:]}


def quantize_weight(w) -> dict:
    """w [in, *out] -> {"weight": e4m3 [*out, in], "scale": float32 [*out]}."""
    w32 = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), _TINY) / FP8_MAX  # [*out]
    weight = jnp.clip(jnp.moveaxis(w32 / scale, 0, -1), -FP8_MAX, FP8_MAX).astype(FP8)
    return {"weight": weight, "scale": scale}


def linear(x, w):
    """x [T, in] times a weight [in, *out] (an array, or a `quantize_weight` dict) -> [T, *out].
    FP8 activations from FP8_ACTIVATION_MIN_ROWS rows up (a static choice: the bucket's)."""
    if not isinstance(w, dict):
        return jnp.tensordot(x, w, axes=1)
    return fp8_linear(x, w, quantize_activations=x.shape[0] >= FP8_ACTIVATION_MIN_ROWS)


def fp8_linear(x, w: dict, *, quantize_activations: bool):
    """x [T, in] times a `quantize_weight` dict -> [T, *out], in x's dtype. With
    `quantize_activations`, e4m3 x e4m3 (x quantized per token); else x times the weight
    converted to x's dtype inside the matmul (FP8 bytes read, the arithmetic in x's dtype)."""
    weight, w_scale = w["weight"], w["scale"]
    dims = (((1,), (weight.ndim - 1,)), ((), ()))
    if not quantize_activations:
        y = jax.lax.dot_general(x, weight.astype(x.dtype), dims)  # [T, *out]
        return (y.astype(jnp.float32) * w_scale).astype(x.dtype)
    x32 = x.astype(jnp.float32)
    x_scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), _TINY) / FP8_MAX  # [T]
    xq = jnp.clip(x32 / x_scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8)
    y = jax.lax.dot_general(xq, weight, dims, preferred_element_type=x.dtype)  # [T, *out]
    x_scale = x_scale.reshape(x_scale.shape + (1,) * (y.ndim - 1))
    return (y.astype(jnp.float32) * x_scale * w_scale).astype(x.dtype)


def quantize_params(params: dict, shardings: dict, method: str) -> dict:
    """Quantizes every layer's linear weights in place of the originals (each freed as soon as it
    is quantized, so a model needs its full-precision size once, not twice). `shardings`: the
    quantized tree's shardings (`params.param_shardings(plan, method)`)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    programs: dict = {}  # one compiled quantization per distinct leaf kind (layers repeat them)
    layers = []
    for layer, layer_shardings in zip(params["layers"], shardings["layers"]):
        layer = dict(layer)
        for name in QUANTIZED_LEAVES:
            w, out = layer[name], layer_shardings[name]
            kind = (w.shape, w.dtype, out["weight"], out["scale"])
            if kind not in programs:
                programs[kind] = jax.jit(quantize_weight, out_shardings=out)
            layer[name] = programs[kind](w)
            w.delete()
        layers.append(layer)
    return {**params, "layers": layers}
