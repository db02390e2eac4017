"""Decode-sized linear layers on NVIDIA GPUs: GEMV kernels with the small ops around them inside.

In a batch-1 decode step of an 8B model XLA runs 13 kernels a layer: the four GEMMs (three of
them split-K), the split-K reductions (the residual adds fused into two of them), two RMSNorms,
SiLU x up, attention and its split merge. Each small one takes 1.5-1.8 us, a floor set by launch
and ramp-up inside the command buffer rather than by its bytes, and together they are most of
what keeps the step above its weight-bytes floor (benchmarks/results/h200_session10.md).

The kernels here fold them into the GEMMs, for steps of at most MAX_ROWS token rows:
- `rms_norm_matmul`: RMSNorm(x) times several weights side by side -> [M, N_1 + N_2 + ...]
  (q, k and v in one launch, as the rows the decode attention kernel reads);
- `rms_norm_swiglu`: SiLU(RMSNorm(x) @ gate) x (RMSNorm(x) @ up), from a [K, 2, F] gate/up leaf;
- `matmul_add`: residual + x @ w (the o and down projections with the residual add).
A program owns `block_n` output columns and reads their weights over the whole K axis, so there
is no split-K and no reduction kernel. RMSNorm(x) @ W = ((x * norm) @ W) / rms(x), row by row:
the sum of squares accumulates in the same loop and the rows are scaled at the end. The rows
are one dot tile of max(16, M) rows (Triton's smallest), so the weights are read once for them
all. Roundings follow the model: the GEMM outputs are rounded to the model dtype before SiLU x up
or the residual add; the normed rows are not rounded before the product (the model rounds them),
a difference of the order of the dtype's rounding.

Each op has a pure-jnp reference (the model's own composition; the oracle), and a Pallas kernel
lowered through Pallas' Triton backend (interpret mode off the GPU, for tests).

Measured on an H100 (session 15, benchmarks/results/h100_session15.md), these lose to XLA, so the
engine does not use them by default (`runner.GEMV_MAX_ROWS` = 0). At 8 rows, tuned, they read
weights at 0.91 of the copy rate for gate/up (F = 14336 columns: many programs) and 0.84 for down,
but at 0.44 for q/k/v and 0.58 for o (K = 4096, N = 4096-6144): without split-K too few programs
stream too little each, and a program's [block_k, block_n] tile of a [K, N] weight reads rows of
only block_n x 2 bytes. Eight layers without attention: XLA 167.6 us a layer (1.15x the weight
bytes' floor), these kernels 180.2 us (1.23x). What would change that: split-K inside the kernel
(the last program of a column block reducing the partials) or a weight layout with K contiguous.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 64  # beyond this many rows a step's GEMMs are no longer bound by weight bytes alone

# (block_n, block_k, num_warps, num_stages) by op: the fastest at 8 rows in `benchmarks/gemv_bench.py
# --sweep` on an H100 (matmul_add: the best sum of o and down).
CONFIGS = {
    "rms_norm_matmul": (64, 256, 4, 3),
    "rms_norm_swiglu": (64, 64, 4, 3),
    "matmul_add": (32, 256, 4, 4),
}


# ---- references -----------------------------------------------------------------------------

def _rms_norm(x, weight, eps: float):
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


def rms_norm_matmul_reference(x, norm_weight, weights, *, eps: float):
    """x [M, K], norm_weight [K], weights: [K, N_i] each -> [M, sum N_i] in x.dtype."""
    h = _rms_norm(x, norm_weight, eps)
    return jnp.concatenate([jnp.tensordot(h, w, axes=1) for w in weights], axis=1)


def rms_norm_swiglu_reference(x, norm_weight, gate_up, *, eps: float):
    """x [M, K], norm_weight [K], gate_up [K, 2, F] (gate, up) -> SiLU(gate) x up [M, F]."""
    y = jnp.tensordot(_rms_norm(x, norm_weight, eps), gate_up, axes=1)  # [M, 2, F]
    return jax.nn.silu(y[:, 0]) * y[:, 1]


def matmul_add_reference(x, w, residual):
    """x [M, K], w [K, N], residual [M, N] -> residual + x @ w."""
    return residual + jnp.tensordot(x, w, axes=1)


# ---- shapes ---------------------------------------------------------------------------------

def supported(num_rows: int, k_dim: int, widths) -> bool:
    """Whether the kernels take this many rows and these sizes (dot tiles need 16 or more)."""
    return 1 <= num_rows <= MAX_ROWS and k_dim >= 16 and all(n >= 16 for n in widths)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(name: str, x, widths, k_dim: int, extra: dict, want: dict) -> None:
    if x.ndim != 2 or x.shape[1] != k_dim:
        raise ValueError(f"{name}: x must be [M, {k_dim}], got {x.shape}")
    if not supported(x.shape[0], k_dim, widths):
        raise ValueError(f"{name}: the kernel takes 1..{MAX_ROWS} rows and sizes of 16 or more, got "
                         f"{x.shape[0]} rows, K={k_dim}, N={tuple(widths)}")
    bad = {k: v for k, v in extra.items() if tuple(v) != tuple(want[k])}
    if bad:
        raise ValueError(f"{name}: expected shapes {want}, got {extra}")


# ---- kernel ---------------------------------------------------------------------------------

def _round(x, dtype):
    return x.astype(dtype).astype(jnp.float32)


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _gemv_kernel(*refs, widths, normed, swiglu, residual, eps, num_rows, k_dim, block_n, block_k,
                 exact):
    """Program p computes columns [n0, n0 + block_n) of one weight (`widths`: each weight's N, the
    programs taking them in order) for all rows, over K in `block_k` steps."""
    x_ref, *refs = refs
    norm_ref = refs.pop(0) if normed else None
    w_refs, refs = refs[:len(widths)], refs[len(widths):]
    residual_ref = refs[0] if residual else None
    o_ref = refs[-1]
    dtype = o_ref.dtype
    m_rows = max(16, _next_pow2(num_rows))
    row_ok = lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0) < num_rows  # [Mp, 1]
    k_edge = k_dim % block_k != 0
    program = pl.program_id(0)

    def columns(w_ref, first_block, out_col, width):
        n0 = (program - first_block) * block_n
        col_ok = n0 + lax.broadcasted_iota(jnp.int32, (1, block_n), 1) < width  # [1, BN]
        n_edge = width % block_n != 0

        def weight_tile(k0, half=None):
            index = (pl.ds(k0, block_k), pl.ds(n0, block_n)) if half is None else \
                (pl.ds(k0, block_k), jnp.int32(half), pl.ds(n0, block_n))
            if not (k_edge or n_edge):
                return w_ref[index]
            k_ok = k0 + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < k_dim  # [BK, 1]
            return plgpu.load(w_ref.at[index], mask=k_ok & col_ok, other=0.0)

        def body(step, carry):
            accs, sumsq = carry
            k0 = pl.multiple_of(step * block_k, block_k)
            k_ok = k0 + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < k_dim  # [1, BK]
            x = plgpu.load(x_ref.at[pl.ds(0, m_rows), pl.ds(k0, block_k)], mask=row_ok & k_ok,
                           other=0.0).astype(jnp.float32)  # [Mp, BK]
            if normed:
                sumsq = sumsq + jnp.sum(x * x, axis=1)
                norm = norm_ref[pl.ds(k0, block_k)] if not k_edge else plgpu.load(
                    norm_ref.at[pl.ds(k0, block_k)], mask=k0 + jnp.arange(block_k) < k_dim, other=0.0)
                x = x * norm.astype(jnp.float32)[None, :]
            x = x.astype(w_ref.dtype)
            halves = (0, 1) if swiglu else (None,)
            accs = tuple(acc + plgpu.dot(x, weight_tile(k0, half), allow_tf32=not exact)
                         for acc, half in zip(accs, halves))
            return accs, sumsq

        zeros = jnp.zeros((m_rows, block_n), jnp.float32)
        accs, sumsq = lax.fori_loop(0, _cdiv(k_dim, block_k), body,
                                    ((zeros, zeros) if swiglu else (zeros,), jnp.zeros((m_rows,), jnp.float32)))
        if normed:
            inv_rms = lax.rsqrt(sumsq / k_dim + eps)[:, None]  # [Mp, 1]
            accs = tuple(acc * inv_rms for acc in accs)
        if swiglu:
            gate, up = (_round(acc, dtype) for acc in accs)
            out = _round(_silu(gate), dtype) * up
        else:
            out = _round(accs[0], dtype)
        if residual:
            res = plgpu.load(residual_ref.at[pl.ds(0, m_rows), pl.ds(n0, block_n)], mask=row_ok & col_ok,
                             other=0.0)
            out = res.astype(jnp.float32) + out
        plgpu.store(o_ref.at[pl.ds(0, m_rows), pl.ds(out_col + n0, block_n)], out.astype(dtype),
                    mask=row_ok & col_ok)

    first_block, out_col = 0, 0
    for w_ref, width in zip(w_refs, widths):
        blocks = _cdiv(width, block_n)
        pl.when((program >= first_block) & (program < first_block + blocks))(
            functools.partial(columns, w_ref, first_block, out_col, width))
        first_block, out_col = first_block + blocks, out_col + width


def _gemv_call(name, x, norm_weight, weights, residual, *, widths, swiglu, eps, config, interpret):
    block_n, block_k, num_warps, num_stages = config
    num_rows, k_dim = x.shape
    kernel = functools.partial(
        _gemv_kernel, widths=widths, normed=norm_weight is not None, swiglu=swiglu,
        residual=residual is not None, eps=eps, num_rows=num_rows, k_dim=k_dim, block_n=block_n,
        block_k=min(block_k, max(16, _next_pow2(k_dim))), exact=x.dtype == jnp.float32)
    inputs = [a for a in (x, norm_weight, *weights, residual) if a is not None]
    whole = pl.BlockSpec()
    return pl.pallas_call(
        kernel,
        grid=(sum(_cdiv(n, block_n) for n in widths),),
        in_specs=[whole] * len(inputs),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((num_rows, sum(widths)), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)


_STATIC = ("eps", "config", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def rms_norm_matmul_gpu(
    x,  # [M, K]
    norm_weight,  # [K]
    weights,  # tuple of [K, N_i]
    *,
    eps: float,
    config: tuple | None = None,
    interpret: bool = False,
):
    """The kernel of `rms_norm_matmul_reference`: [M, sum N_i] in x.dtype, one launch.
    config: (block_n, block_k, num_warps, num_stages), default CONFIGS["rms_norm_matmul"]."""
    widths = tuple(w.shape[1] for w in weights)
    k_dim = norm_weight.shape[0]
    _check("rms_norm_matmul", x, widths, k_dim, {f"weight {i}": w.shape for i, w in enumerate(weights)},
           {f"weight {i}": (k_dim, n) for i, n in enumerate(widths)})
    return _gemv_call("rms_norm_matmul", x, norm_weight, tuple(weights), None, widths=widths,
                      swiglu=False, eps=eps, config=config or CONFIGS["rms_norm_matmul"],
                      interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def rms_norm_swiglu_gpu(
    x,  # [M, K]
    norm_weight,  # [K]
    gate_up,  # [K, 2, F]
    *,
    eps: float,
    config: tuple | None = None,
    interpret: bool = False,
):
    """The kernel of `rms_norm_swiglu_reference`: [M, F] in x.dtype, one launch."""
    k_dim, _, width = gate_up.shape
    _check("rms_norm_swiglu", x, (width,), k_dim, dict(gate_up=gate_up.shape, norm_weight=norm_weight.shape),
           dict(gate_up=(k_dim, 2, width), norm_weight=(k_dim,)))
    return _gemv_call("rms_norm_swiglu", x, norm_weight, (gate_up,), None, widths=(width,), swiglu=True,
                      eps=eps, config=config or CONFIGS["rms_norm_swiglu"], interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def matmul_add_gpu(
    x,  # [M, K]
    w,  # [K, N]
    residual,  # [M, N]
    *,
    config: tuple | None = None,
    interpret: bool = False,
):
    """The kernel of `matmul_add_reference`: residual + x @ w [M, N] in x.dtype, one launch."""
    k_dim, width = w.shape
    _check("matmul_add", x, (width,), k_dim, dict(residual=residual.shape), dict(residual=(x.shape[0], width)))
    return _gemv_call("matmul_add", x, None, (w,), residual, widths=(width,), swiglu=False, eps=0.0,
                      config=config or CONFIGS["matmul_add"], interpret=interpret)
