"""SwiGLU between two FP8 GEMMs: the gate/up GEMM's raw output to the down GEMM's e4m3 input.

With FP8 activations (`jaxpaged.models.quant`), the MLP between its two GEMMs is: scale the gate/up
GEMM's output by each row's activation scale and each column's weight scale, SiLU(gate) x up, then
quantize each row of the result to e4m3 with its own scale (max |h| / 448) for the down GEMM.

XLA makes two fusions of that: one reads the [T, 2, F] GEMM output to find each row's max, the
next reads it again to quantize. In an 8B prefill step on the H100 (8,192 rows, F = 14,336) they
took 311 + 396 us a layer: 22.6 ms of a 141 ms step, twice what one pass over the bytes costs.
The kernel here is that one pass: a program takes `rows` rows whole, holding each row's SwiGLU
output in registers while it finds the max, then writes the e4m3 row and its scale. A row is read
as chunks of `chunk` columns (the largest power of two dividing F, at most 2048), unrolled, so
every load is in bounds and a power of two wide for any F.

Intermediate roundings follow the unfused model: the scaled gate and up values and SiLU x up are
rounded to the model dtype (bf16 on GPUs) before the quantization, so the kernel and the reference
compute the same function.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
TINY = 1e-12  # the scale floor: an all-zero row (padding) quantizes to zeros
MAX_CHUNK = 2048  # columns per load: 8 bf16 (16 bytes) per thread with 8 warps
MAX_CHUNKS = 128  # unrolled loads per row; beyond this (F with a small power-of-two factor) use jnp


def quantize_rows(x):
    """x [T, K] -> (e4m3 [T, K], float32 scale [T]): each row scaled by max |x| / 448."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), TINY) / FP8_MAX  # [T]
    return jnp.clip(x32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _round(x, dtype):
    """x (float32) rounded to `dtype` and back: the model dtype's value, computed in float32."""
    return x.astype(dtype).astype(jnp.float32)


def swiglu_fp8_reference(y, x_scale, w_scale, *, dtype):
    """The pure-jnp op (any device; the oracle and the fallback).

    y [T, 2, F]: the e4m3 gate/up GEMM's raw output (before scaling); x_scale [T] float32: each
    row's activation scale; w_scale [2, F] float32: each output channel's weight scale; dtype:
    the model dtype. Returns (h e4m3 [T, F], h_scale float32 [T]).
    """
    gate_up = _round(y.astype(jnp.float32) * x_scale[:, None, None] * w_scale[None], dtype)  # [T, 2, F]
    h = _round(_silu(gate_up[:, 0]) * gate_up[:, 1], dtype)  # [T, F]
    return quantize_rows(h)


def chunk_size(width: int) -> int:
    """Columns per load for a row of `width`: the largest power of two dividing it, at most 2048."""
    return min(width & -width, MAX_CHUNK)


def supported(width: int) -> bool:
    """Whether the kernel takes rows of `width` (enough power-of-two factor for its loads)."""
    return width > 0 and width // chunk_size(width) <= MAX_CHUNKS and chunk_size(width) >= 16


def _validate(y, x_scale, w_scale) -> None:
    if y.ndim != 3 or y.shape[1] != 2:
        raise ValueError(f"y must be the gate/up output [T, 2, F], got {y.shape}")
    num_rows, _, width = y.shape
    if x_scale.shape != (num_rows,) or w_scale.shape != (2, width):
        raise ValueError(f"x_scale must be [{num_rows}] and w_scale [2, {width}], got "
                         f"{x_scale.shape} and {w_scale.shape}")


def _kernel(y_ref, x_scale_ref, w_scale_ref, h_ref, h_scale_ref, *, rows, chunk, num_chunks, dtype):
    first = pl.program_id(0) * rows
    block = pl.ds(first, rows)
    x_scale = x_scale_ref[block][:, None]  # [R, 1]
    parts, amax = [], jnp.zeros((rows,), jnp.float32)
    for c in range(num_chunks):  # the row stays in registers between the max and the stores
        cols = pl.ds(c * chunk, chunk)
        gate = _round(y_ref[block, 0, cols].astype(jnp.float32) * x_scale * w_scale_ref[0, cols][None, :], dtype)
        up = _round(y_ref[block, 1, cols].astype(jnp.float32) * x_scale * w_scale_ref[1, cols][None, :], dtype)
        h = _round(_silu(gate) * up, dtype)  # [R, C]
        amax = jnp.maximum(amax, jnp.max(jnp.abs(h), axis=1))
        parts.append(h)
    scale = jnp.maximum(amax, TINY) / FP8_MAX  # [R]
    for c, h in enumerate(parts):
        h_ref[block, pl.ds(c * chunk, chunk)] = jnp.clip(h / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8)
    h_scale_ref[block] = scale


@functools.partial(jax.jit, static_argnames=("dtype", "rows", "num_warps", "interpret"))
def swiglu_fp8_gpu(
    y,  # [T, 2, F] raw gate/up GEMM output
    x_scale,  # [T] float32
    w_scale,  # [2, F] float32
    *,
    dtype,
    rows: int = 1,
    num_warps: int | None = None,
    interpret: bool = False,
):
    """The Pallas (Triton) kernel; same contract as `swiglu_fp8_reference`. `rows`: rows a
    program takes (it must divide T); `num_warps` None: by the row's width."""
    _validate(y, x_scale, w_scale)
    num_rows, _, width = y.shape
    if not supported(width):
        raise ValueError(f"the kernel needs F with a power-of-two factor >= 16 and at most "
                         f"{MAX_CHUNKS} chunks, got F={width}")
    if rows < 1 or num_rows % rows or rows & (rows - 1):
        raise ValueError(f"rows={rows} must be a power of two dividing T={num_rows}")
    chunk = chunk_size(width)
    if num_warps is None:  # ~8 float32 of the row per thread
        num_warps = min(16, max(4, 1 << max(rows * width // 2048 - 1, 0).bit_length()))
    kernel = functools.partial(_kernel, rows=rows, chunk=chunk, num_chunks=width // chunk,
                               dtype=jnp.dtype(dtype))
    whole = pl.BlockSpec()
    return pl.pallas_call(
        kernel,
        grid=(num_rows // rows,),
        in_specs=[whole, whole, whole],
        out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct((num_rows, width), FP8),
                   jax.ShapeDtypeStruct((num_rows,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="swiglu_fp8",
    )(y, x_scale.astype(jnp.float32), w_scale.astype(jnp.float32))
