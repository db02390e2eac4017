"""Decode-step matmuls for NVIDIA GPUs with the layer's norm and residual folded in.

A decode step multiplies a few rows (M = the token bucket, 16 at batch 1) by each weight matrix,
so it is bound by reading the weights. XLA's own Triton GEMMs read them at about the copy rate,
but around them a batch-1 Llama layer launches eight small kernels (RMSNorm twice, the split-K
reductions of q/k/v, o and down, SiLU x up) at 1.4-1.8 us each, ~0.4 ms a step on an 8B model
(benchmarks/results/h200_session10.md). These kernels do that work inside the matmul:
- the grid runs over column blocks only, `block_n` wide and small, so there are enough programs
  to keep the weight reads in flight without splitting K (no reduction kernel after them);
- RMSNorm is a prologue: each program sums x^2 over K as it streams x, multiplies x by the norm
  weight before the dot and scales the result rows by 1/rms at the end (the norm is per row, so
  rms_norm(x) @ W == diag(1/rms) ((x * weight) @ W));
- the residual add and the SwiGLU gate are epilogues.
`norm_matmul` is q/k/v (three weights into one output, the layout the decode attention reads),
`norm_swiglu` is gate/up + SiLU x up, `matmul_add` is o and down.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# (block_n, block_k, num_warps, num_stages) per op; see benchmarks/decode_matmul_bench.py.
DEFAULT_TILES = {
    "norm_matmul": (32, 256, 4, 4),
    "norm_swiglu": (32, 256, 4, 4),
    "matmul_add": (32, 256, 4, 4),
}


def supports(num_rows: int, k_size: int, n_sizes, tiles) -> bool:
    """Whether the kernels take this shape: rows a power of two >= 16 (Triton's dot), and K and
    every N a multiple of the tile."""
    block_n, block_k = tiles[0], tiles[1]
    return (num_rows >= 16 and num_rows & (num_rows - 1) == 0 and k_size % block_k == 0
            and all(n % block_n == 0 for n in n_sizes))


def _kernel(x_ref, g_ref, r_ref, *refs, segments, block_n, block_k, eps, swiglu, exact, transposed):
    *w_refs, o_ref = refs
    pid = pl.program_id(0)
    m_rows, k_size = x_ref.shape

    def column_block(w_ref, n0, out_col):
        def body(i, carry):
            accs, squares = carry
            k0 = pl.multiple_of(i * block_k, block_k)
            x = x_ref[:, pl.ds(k0, block_k)]  # [M, BK]
            if g_ref is not None:
                x32 = x.astype(jnp.float32)
                squares = squares + jnp.sum(x32 * x32, axis=1)
                x = (x32 * g_ref[pl.ds(k0, block_k)].astype(jnp.float32)[None, :]).astype(x.dtype)
            if swiglu:
                tiles = (w_ref[pl.ds(k0, block_k), 0, pl.ds(n0, block_n)],
                         w_ref[pl.ds(k0, block_k), 1, pl.ds(n0, block_n)])
            elif transposed:
                tiles = (w_ref[pl.ds(n0, block_n), pl.ds(k0, block_k)],)
            else:
                tiles = (w_ref[pl.ds(k0, block_k), pl.ds(n0, block_n)],)
            accs = tuple(acc + plgpu.dot(x, w, trans_b=transposed, allow_tf32=not exact)
                         for acc, w in zip(accs, tiles))
            return accs, squares

        zeros = jnp.zeros((m_rows, block_n), jnp.float32)
        accs, squares = lax.fori_loop(0, k_size // block_k, body,
                                      ((zeros, zeros) if swiglu else (zeros,),
                                       jnp.zeros((m_rows,), jnp.float32)))
        if g_ref is not None:
            scale = lax.rsqrt(squares / k_size + eps)[:, None]
            accs = tuple(acc * scale for acc in accs)
        if swiglu:
            gate, up = accs
            y = gate / (1.0 + jnp.exp(-gate)) * up
        else:
            y = accs[0]
        if r_ref is not None:
            y = y + r_ref[:, pl.ds(out_col, block_n)].astype(jnp.float32)
        o_ref[:, pl.ds(out_col, block_n)] = y.astype(o_ref.dtype)

    for w_ref, (first, count, col) in zip(w_refs, segments):
        @pl.when((pid >= first) & (pid < first + count))
        def _(w_ref=w_ref, first=first, col=col):
            n0 = pl.multiple_of((pid - first) * block_n, block_n)
            column_block(w_ref, n0, col + n0)


def _call(x, norm_weight, residual, weights, *, eps, swiglu, tiles, interpret, name, transposed=False):
    block_n, block_k, num_warps, num_stages = tiles
    widths = [w.shape[0 if transposed else -1] for w in weights]
    if not supports(x.shape[0], x.shape[1], widths, tiles):
        raise ValueError(f"{name}: rows {x.shape[0]}, K {x.shape[1]}, N {widths} do not fit tiles {tiles}")
    segments, first, col = [], 0, 0
    for width in widths:
        segments.append((first, width // block_n, col))
        first, col = first + width // block_n, col + width
    operands = [a for a in (x, norm_weight, residual) if a is not None] + list(weights)
    present = (True, norm_weight is not None, residual is not None)

    def kernel(*refs):
        it = iter(refs)
        x_ref, g_ref, r_ref = [next(it) if p else None for p in present]
        _kernel(x_ref, g_ref, r_ref, *it, segments=tuple(segments), block_n=block_n,
                block_k=block_k, eps=eps, swiglu=swiglu, exact=x.dtype == jnp.float32,
                transposed=transposed)

    whole = pl.BlockSpec()
    return pl.pallas_call(
        kernel,
        grid=(first,),
        in_specs=[whole] * len(operands),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((x.shape[0], col), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("eps", "tiles", "interpret"))
def norm_matmul(x, norm_weight, weights, *, eps: float, tiles=DEFAULT_TILES["norm_matmul"],
                interpret: bool = False):
    """rms_norm(x, norm_weight) @ concat(weights, axis=1): x [M, K], weights a tuple of [K, N_i]
    -> [M, sum N_i] in x's dtype."""
    return _call(x, norm_weight, None, tuple(weights), eps=eps, swiglu=False, tiles=tiles,
                 interpret=interpret, name="decode_gemm_norm")


@functools.partial(jax.jit, static_argnames=("eps", "tiles", "interpret"))
def norm_swiglu(x, norm_weight, gate_up, *, eps: float, tiles=DEFAULT_TILES["norm_swiglu"],
                interpret: bool = False):
    """silu(h @ gate) * (h @ up) for h = rms_norm(x, norm_weight): x [M, K], gate_up [K, 2, F]
    -> [M, F] in x's dtype."""
    return _call(x, norm_weight, None, (gate_up,), eps=eps, swiglu=True, tiles=tiles,
                 interpret=interpret, name="decode_gemm_norm_swiglu")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "transposed"))
def matmul_add(x, weight, residual, *, tiles=DEFAULT_TILES["matmul_add"], interpret: bool = False,
               transposed: bool = False):
    """residual + x @ weight: x [M, K], weight [K, N] ([N, K] if transposed), residual [M, N]
    -> [M, N] in x's dtype."""
    return _call(x, None, residual, (weight,), eps=0.0, swiglu=False, tiles=tiles,
                 interpret=interpret, name="decode_gemm_add", transposed=transposed)
