"""FP8 (e4m3) weights and activations for the linear layers: vLLM's `--quantization fp8`.

A bf16 (or float32) checkpoint is quantized when it loads, as vLLM does for an unquantized model:
- each weight per output channel: scale = max |w| over the input axis / 448, stored as e4m3
  with its input axis last ([*out, in]: the "TN" layout NVIDIA's FP8 GEMMs read without a
  transpose), with a float32 scale per output channel;
- each activation per token, in the step (dynamic): scale = max |x| over the row / 448.

`linear` then multiplies e4m3 by e4m3 and applies both scales to the output, where XLA fuses
them into the ops that read it (rope, the q/k/v relayout); in small (decode) buckets it keeps
activations in the model dtype (FP8_ACTIVATION_MIN_ROWS). Between GEMMs, one op per gap reads
the rows once (`Fp8Ops`): the residual add + RMSNorm + quantization after o and down, SiLU x up
+ quantization inside the MLP, the quantization of the attention output. Per-token scales keep a
sequence's outputs independent of what else is in its batch, though not of its bucket. Quantized: q/k/v, o, gate/up and
down of every layer; the embedding, the LM head and the norms stay in the model dtype.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged.config import QUANTIZATIONS
from pallas_kernels.fp8_activations import (FP8, FP8_MAX, TINY, add_rms_norm_fp8_reference,
                                            quantize_rows, swiglu_fp8_reference)

QUANTIZED_LEAVES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Buckets below this many rows multiply bf16 activations by the e4m3 weights converted inside
# XLA's GEMM fusion (decode is bound by weight bytes, which that halves); from here up, e4m3 x
# e4m3 on cuBLASLt (prefill is bound by arithmetic, which that doubles). The 8B forward on an
# H200 (ms; benchmarks/results/h200_session13.md), weight-only vs activations quantized: batch 1
# 3.32 vs 4.09, 32: 4.91 vs 5.47, 64: 6.87 vs 7.06, 256: 17.27 vs 14.29 (bf16: 4.42 at 1, 5.83
# at 32). 128 rows was not timed.
FP8_ACTIVATION_MIN_ROWS = 128


def fp8_compiler_options(quantization: str | None, platform: str, *, rows: int) -> dict | None:
    """XLA options for compiling a forward of `rows` token rows, or None for the defaults.

    Where activations are quantized (FP8_ACTIVATION_MIN_ROWS rows up) on a GPU, XLA's Triton
    GEMMs are switched off for that program alone: otherwise XLA autotunes Triton candidates for
    every e4m3 x e4m3 GEMM (12-18 s each for an 8B model's prefill shapes on the H200) and then
    picks cuBLASLt anyway, at the same speed (session 13: q/k/v at 8,448 rows 412 vs 420 us), which
    made an FP8 engine's cold start 114-160 s instead of ~30. Decode buckets keep the Triton GEMMs
    that fold the e4m3 -> bf16 convert into the matmul. The flag is a per-program compile option,
    not XLA_FLAGS, so nothing else in the process changes."""
    if quantization != "fp8" or platform != "gpu" or rows < FP8_ACTIVATION_MIN_ROWS:
        return None
    return {"xla_gpu_enable_triton_gemm": False}


def quantized_axes(logical_axes: tuple) -> dict:
    """Logical axes of a quantized leaf, from its unquantized [in, *out] axes."""
    return {"weight": logical_axes[1:] + logical_axes[:1], "scale": logical_axes[1:]}


def quantize_weight(w) -> dict:
    """w [in, *out] -> {"weight": e4m3 [*out, in], "scale": float32 [*out]}."""
    w32 = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=0), TINY) / FP8_MAX  # [*out]
    weight = jnp.clip(jnp.moveaxis(w32 / scale, 0, -1), -FP8_MAX, FP8_MAX).astype(FP8)
    return {"weight": weight, "scale": scale}


class Fp8Rows(NamedTuple):
    """Activations quantized per row: the input of the FP8 GEMMs that read them."""
    values: jax.Array  # e4m3 [T, K]
    scale: jax.Array  # float32 [T]
    dtype: Any  # the model dtype (of the GEMMs' outputs)


class Fp8Product(NamedTuple):
    """An e4m3 x e4m3 GEMM's raw output with the scales still to apply: what an output projection
    (o, down) hands to the residual add, so one op scales, adds, norms and quantizes it."""
    raw: jax.Array  # [T, *out] in the model dtype, unscaled
    x_scale: jax.Array  # float32 [T]
    w_scale: jax.Array  # float32 [*out]

    def scaled(self):
        return scale_output(self.raw, self.x_scale, self.w_scale, self.raw.dtype)


class Fp8Ops(NamedTuple):
    """The row-wise ops between FP8 GEMMs (`pallas_kernels.fp8_activations`): the Pallas kernels
    where the runner picks them (`runner.pick_fp8_ops`), else the jnp references."""
    quantize: Callable = quantize_rows  # x [T, K] -> (e4m3 [T, K], scale [T])
    swiglu: Callable = swiglu_fp8_reference  # (y [T, 2, F], x_scale, w_scale, dtype=) -> (h, h_scale)
    add_rms_norm: Callable = add_rms_norm_fp8_reference  # (residual, y, x_scale, w_scale, norm, eps=)


def quantizes_activations(x, w) -> bool:
    """Whether a linear of x [T, in] by `w` multiplies e4m3 by e4m3 (an FP8 weight in a large
    bucket): then its input is quantized once, by the op before it, as `Fp8Rows`."""
    return isinstance(w, dict) and x.shape[0] >= FP8_ACTIVATION_MIN_ROWS


def linear(x, w):
    """x [T, in] (or `Fp8Rows`) times a weight [in, *out] (an array, or a `quantize_weight` dict)
    -> [T, *out] in the model dtype."""
    if isinstance(x, Fp8Rows):
        return scale_output(fp8_matmul(x.values, w["weight"], x.dtype), x.scale, w["scale"], x.dtype)
    if not isinstance(w, dict):
        return jnp.tensordot(x, w, axes=1)
    return fp8_linear(x, w, quantize_activations=quantizes_activations(x, w))


def project(x, w, ops: Fp8Ops):
    """An output projection (o): x [T, in] times `w`, as `linear`, except that with FP8
    activations the product stays raw (`Fp8Product`) for `layers.add_rms_norm` to scale."""
    if not quantizes_activations(x, w):
        return linear(x, w)
    xq, x_scale = ops.quantize(x)
    return Fp8Product(fp8_matmul(xq, w["weight"], x.dtype), x_scale, w["scale"])


def fp8_linear(x, w: dict, *, quantize_activations: bool):
    """x [T, in] times a `quantize_weight` dict -> [T, *out], in x's dtype. With
    `quantize_activations`, e4m3 x e4m3 (x quantized per token); else x times the weight
    converted to x's dtype inside the matmul (FP8 bytes read, the arithmetic in x's dtype)."""
    if not quantize_activations:
        y = jax.lax.dot_general(x, w["weight"].astype(x.dtype), _dims(w["weight"]))  # [T, *out]
        return (y.astype(jnp.float32) * w["scale"]).astype(x.dtype)
    xq, x_scale = quantize_rows(x)
    return scale_output(fp8_matmul(xq, w["weight"], x.dtype), x_scale, w["scale"], x.dtype)


def fp8_matmul(xq, weight, dtype):
    """e4m3 xq [T, in] times an e4m3 weight [*out, in] -> the raw (unscaled) [T, *out] in dtype."""
    return jax.lax.dot_general(xq, weight, _dims(weight), preferred_element_type=dtype)


def scale_output(y, x_scale, w_scale, dtype):
    """A raw e4m3 product y [T, *out] scaled by its rows' x_scale [T] and columns' w_scale [*out]."""
    x_scale = x_scale.reshape(x_scale.shape + (1,) * (y.ndim - 1))
    return (y.astype(jnp.float32) * x_scale * w_scale).astype(dtype)


def fp8_swiglu_mlp(h: Fp8Rows, gate_up: dict, down: dict, ops: Fp8Ops) -> Fp8Product:
    """The SwiGLU MLP on e4m3 rows: between the two GEMMs `ops.swiglu` scales the gate/up product,
    applies SiLU x up and quantizes each row for the down GEMM, in one pass."""
    y = fp8_matmul(h.values, gate_up["weight"], h.dtype)  # [T, 2, F] raw
    act, act_scale = ops.swiglu(y, h.scale, gate_up["scale"], dtype=h.dtype)  # e4m3 [T, F], [T]
    return Fp8Product(fp8_matmul(act, down["weight"], h.dtype), act_scale, down["scale"])


def _dims(weight):
    """dot_general dimensions of x [T, in] against a weight [*out, in]."""
    return (((1,), (weight.ndim - 1,)), ((), ()))


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
