"""Row-wise ops around FP8 GEMMs: each reads its rows once and writes them once.

With FP8 activations (`jaxpaged.models.quant`), every linear layer's input is quantized per row
(token) to e4m3 with its own scale (max |row| / 448), and every GEMM's raw output is scaled by its
rows' and columns' scales. Between the GEMMs of a decoder layer that makes three kinds of op:

- `swiglu_fp8`: the gate/up product -> scale, SiLU(gate) x up -> the down GEMM's e4m3 rows.
- `add_rms_norm_fp8`: an output projection's (o or down) product -> scale, add to the residual
  stream, RMSNorm -> the next GEMM's e4m3 rows, and the new residual stream.
- `quantize_fp8`: plain rows (the attention output) -> e4m3 rows.

XLA compiles each into two or three fusions that read the rows again to quantize them once their
max is known: in an 8B prefill step on the H100 (8,192 rows), the SwiGLU alone took 311 + 396 us
a layer, twice what one pass over its bytes costs. Each kernel here is one pass: a program takes
`rows` rows whole, keeps them in registers (in the model dtype) while it finds their max, then
writes the e4m3 rows and their scales. Rows are read in chunks of `chunk` columns (the largest
power of two dividing the width, at most 2048), unrolled, so every load is in bounds and a power
of two wide for any width.

Roundings follow the unfused model: scaled products, sums, norms and SiLU x up are rounded to the
model dtype (bf16 on GPUs) where the model rounds them, so kernels and references compute the
same function. Each op has a pure-jnp reference (any device; the oracle and the fallback) and a
Pallas kernel lowered through Pallas' Triton backend (NVIDIA GPUs; interpret mode elsewhere).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
TINY = 1e-12  # the scale floor: an all-zero row (padding) quantizes to zeros
MAX_CHUNK = 2048  # columns per load: 8 bf16 (16 bytes) per thread with 8 warps
MAX_CHUNKS = 128  # unrolled loads per row; beyond this (a small power-of-two factor) use jnp


# ---- references -----------------------------------------------------------------------------

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
    """y [T, 2, F]: the e4m3 gate/up GEMM's raw output; x_scale [T] float32: each row's
    activation scale; w_scale [2, F] float32: each output channel's weight scale; dtype: the model
    dtype. Returns (h e4m3 [T, F], h_scale float32 [T])."""
    gate_up = _round(y.astype(jnp.float32) * x_scale[:, None, None] * w_scale[None], dtype)  # [T, 2, F]
    return quantize_rows(_round(_silu(gate_up[:, 0]) * gate_up[:, 1], dtype))


def add_rms_norm_fp8_reference(residual, y, x_scale, w_scale, norm_weight, *, eps: float):
    """residual [T, D] in the model dtype; y [T, D]: an output projection's raw e4m3 product, with
    its row scales x_scale [T] and column scales w_scale [D]; norm_weight [D]. Returns (the new
    residual stream [T, D] = residual + the scaled product, its RMSNorm as e4m3 [T, D], the
    norm's row scales float32 [T])."""
    dtype = residual.dtype
    delta = _round(y.astype(jnp.float32) * x_scale[:, None] * w_scale[None], dtype)
    x = _round(residual.astype(jnp.float32) + delta, dtype)  # [T, D]
    normed = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    h, h_scale = quantize_rows(_round(norm_weight.astype(jnp.float32) * normed, dtype))
    return x.astype(dtype), h, h_scale


# ---- shapes ---------------------------------------------------------------------------------

def chunk_size(width: int) -> int:
    """Columns per load for a row of `width`: the largest power of two dividing it, at most 2048."""
    return min(width & -width, MAX_CHUNK)


def supported(width: int) -> bool:
    """Whether the kernels take rows of `width` (enough power-of-two factor for their loads)."""
    return width > 0 and chunk_size(width) >= 16 and width // chunk_size(width) <= MAX_CHUNKS


def _check(name: str, width: int, num_rows: int, rows: int) -> int:
    """Validates; returns the rows a program takes: `rows`, or the largest power of two dividing T
    below it (a small bucket)."""
    if not supported(width):
        raise ValueError(f"{name}: the kernel needs a width with a power-of-two factor >= 16 and at "
                         f"most {MAX_CHUNKS} chunks, got {width}")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"{name}: rows={rows} must be a power of two")
    return math.gcd(rows, num_rows)


def _check_shapes(name: str, got: dict, want: dict) -> None:
    bad = {k: v for k, v in got.items() if tuple(v) != tuple(want[k])}
    if bad:
        raise ValueError(f"{name}: expected shapes {want}, got {got}")


def _num_warps(num_warps, values: int) -> int:
    """Warps for a program that loads `values` values a chunk at a time: ~8 per thread, 4 to 16.
    (SwiGLU at F = 14336 loads 2 x 14336: 16 warps, the fastest variant on the H100 and H200.)"""
    if num_warps is not None:
        return num_warps
    return min(16, max(4, 1 << max(values // 2048 - 1, 0).bit_length()))


def _row_call(kernel, grid: int, out_shape, num_warps: int, interpret: bool, name: str):
    whole = pl.BlockSpec()
    return pl.pallas_call(
        kernel, grid=(grid,), out_specs=[whole] * len(out_shape), out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=name)


# ---- kernels --------------------------------------------------------------------------------

def _store_quantized(parts, h_ref, scale_ref, block, chunk):
    """Quantizes rows held as `parts` (chunks [R, C] in the model dtype) with one scale per row."""
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(p.astype(jnp.float32)), axis=1) for p in parts])
    scale = jnp.maximum(amax, TINY) / FP8_MAX  # [R]
    for c, part in enumerate(parts):
        q = jnp.clip(part.astype(jnp.float32) / scale[:, None], -FP8_MAX, FP8_MAX)
        h_ref[block, pl.ds(c * chunk, chunk)] = q.astype(FP8)
    scale_ref[block] = scale


def _swiglu_kernel(y_ref, x_scale_ref, w_scale_ref, h_ref, h_scale_ref, *, rows, chunk, num_chunks, dtype):
    block = pl.ds(pl.program_id(0) * rows, rows)
    x_scale = x_scale_ref[block][:, None]  # [R, 1]
    parts = []
    for c in range(num_chunks):
        cols = pl.ds(c * chunk, chunk)
        gate = _round(y_ref[block, 0, cols].astype(jnp.float32) * x_scale * w_scale_ref[0, cols][None, :], dtype)
        up = _round(y_ref[block, 1, cols].astype(jnp.float32) * x_scale * w_scale_ref[1, cols][None, :], dtype)
        parts.append((_silu(gate) * up).astype(dtype))  # [R, C]
    _store_quantized(parts, h_ref, h_scale_ref, block, chunk)


def _add_rms_norm_kernel(residual_ref, y_ref, x_scale_ref, w_scale_ref, norm_ref, x_ref, h_ref,
                         h_scale_ref, *, rows, chunk, num_chunks, eps):
    block = pl.ds(pl.program_id(0) * rows, rows)
    dtype = residual_ref.dtype
    x_scale = x_scale_ref[block][:, None]  # [R, 1]
    sums, xs = jnp.zeros((rows,), jnp.float32), []
    for c in range(num_chunks):
        cols = pl.ds(c * chunk, chunk)
        delta = _round(y_ref[block, cols].astype(jnp.float32) * x_scale * w_scale_ref[cols][None, :], dtype)
        x = (residual_ref[block, cols].astype(jnp.float32) + delta).astype(dtype)  # [R, C]
        x_ref[block, cols] = x
        x32 = x.astype(jnp.float32)
        sums += jnp.sum(x32 * x32, axis=1)
        xs.append(x)
    inv_rms = lax.rsqrt(sums / (num_chunks * chunk) + eps)[:, None]  # [R, 1]
    parts = [(norm_ref[pl.ds(c * chunk, chunk)].astype(jnp.float32)[None, :] * (x.astype(jnp.float32) * inv_rms)
              ).astype(dtype) for c, x in enumerate(xs)]
    _store_quantized(parts, h_ref, h_scale_ref, block, chunk)


def _quantize_kernel(x_ref, h_ref, h_scale_ref, *, rows, chunk, num_chunks):
    block = pl.ds(pl.program_id(0) * rows, rows)
    parts = [x_ref[block, pl.ds(c * chunk, chunk)] for c in range(num_chunks)]
    _store_quantized(parts, h_ref, h_scale_ref, block, chunk)


# ---- public ops -----------------------------------------------------------------------------

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
    """The kernel of `swiglu_fp8_reference`. `rows`: rows a program takes (a power of two; fewer
    where T has a smaller power-of-two factor); `num_warps` None: by the values a program loads."""
    num_rows, width = y.shape[0], y.shape[-1]
    _check_shapes("swiglu_fp8", dict(y=y.shape, x_scale=x_scale.shape, w_scale=w_scale.shape),
                  dict(y=(num_rows, 2, width), x_scale=(num_rows,), w_scale=(2, width)))
    rows = _check("swiglu_fp8", width, num_rows, rows)
    chunk = chunk_size(width)
    kernel = functools.partial(_swiglu_kernel, rows=rows, chunk=chunk, num_chunks=width // chunk,
                               dtype=jnp.dtype(dtype))
    out_shape = [jax.ShapeDtypeStruct((num_rows, width), FP8), jax.ShapeDtypeStruct((num_rows,), jnp.float32)]
    return _row_call(kernel, num_rows // rows, out_shape, _num_warps(num_warps, 2 * rows * width), interpret,
                     "swiglu_fp8")(y, x_scale.astype(jnp.float32), w_scale.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("eps", "rows", "num_warps", "interpret"))
def add_rms_norm_fp8_gpu(
    residual,  # [T, D] model dtype
    y,  # [T, D] raw output-projection product
    x_scale,  # [T] float32
    w_scale,  # [D] float32
    norm_weight,  # [D]
    *,
    eps: float,
    rows: int = 4,
    num_warps: int | None = None,
    interpret: bool = False,
):
    """The kernel of `add_rms_norm_fp8_reference`."""
    num_rows, width = residual.shape
    _check_shapes("add_rms_norm_fp8", dict(y=y.shape, x_scale=x_scale.shape, w_scale=w_scale.shape,
                                           norm_weight=norm_weight.shape),
                  dict(y=(num_rows, width), x_scale=(num_rows,), w_scale=(width,), norm_weight=(width,)))
    rows = _check("add_rms_norm_fp8", width, num_rows, rows)
    chunk = chunk_size(width)
    kernel = functools.partial(_add_rms_norm_kernel, rows=rows, chunk=chunk, num_chunks=width // chunk,
                               eps=eps)
    out_shape = [jax.ShapeDtypeStruct(residual.shape, residual.dtype),
                 jax.ShapeDtypeStruct((num_rows, width), FP8), jax.ShapeDtypeStruct((num_rows,), jnp.float32)]
    return _row_call(kernel, num_rows // rows, out_shape, _num_warps(num_warps, rows * width), interpret,
                     "add_rms_norm_fp8")(residual, y, x_scale.astype(jnp.float32),
                                         w_scale.astype(jnp.float32), norm_weight)


@functools.partial(jax.jit, static_argnames=("rows", "num_warps", "interpret"))
def quantize_fp8_gpu(
    x,  # [T, K]
    *,
    rows: int = 4,
    num_warps: int | None = None,
    interpret: bool = False,
):
    """The kernel of `quantize_rows`: x [T, K] -> (e4m3 [T, K], float32 scale [T])."""
    num_rows, width = x.shape
    rows = _check("quantize_fp8", width, num_rows, rows)
    chunk = chunk_size(width)
    kernel = functools.partial(_quantize_kernel, rows=rows, chunk=chunk, num_chunks=width // chunk)
    out_shape = [jax.ShapeDtypeStruct((num_rows, width), FP8), jax.ShapeDtypeStruct((num_rows,), jnp.float32)]
    return _row_call(kernel, num_rows // rows, out_shape, _num_warps(num_warps, rows * width), interpret,
                     "quantize_fp8")(x)
