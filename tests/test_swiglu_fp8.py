"""The op between an FP8 MLP's GEMMs (`pallas_kernels.swiglu_fp8`): the jnp reference against a
numpy oracle (ml_dtypes' rounding), the Pallas kernel against the reference in interpret mode (CPU)
and compiled (GPU-marked), and its CUDA lowering on any host."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from pallas_kernels.swiglu_fp8 import (chunk_size, supported, swiglu_fp8_gpu,
                                       swiglu_fp8_reference)

E4M3 = ml_dtypes.float8_e4m3fn


def make_inputs(num_rows: int, width: int, dtype, seed: int = 0):
    """A raw gate/up product of e4m3 operands (large values, as the GEMM gives), per-row and
    per-column scales, and one all-zero row (a padding token)."""
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((num_rows, 2, width)) * 3000).astype(np.float32)
    y[num_rows // 2] = 0.0
    x_scale = rng.uniform(1e-3, 2e-2, num_rows).astype(np.float32)
    w_scale = rng.uniform(1e-4, 2e-3, (2, width)).astype(np.float32)
    return jnp.asarray(y, dtype), jnp.asarray(x_scale), jnp.asarray(w_scale)


def numpy_oracle(y, x_scale, w_scale, dtype):
    """The unfused MLP's arithmetic in numpy: the linear's output and SiLU x up in the model dtype,
    then each row quantized to e4m3 by max |h| / 448."""
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    gate_up = (np.asarray(y, np.float32) * x_scale[:, None, None] * w_scale[None]).astype(np_dtype)
    gate, up = gate_up[:, 0].astype(np.float32), gate_up[:, 1].astype(np.float32)
    h = (gate / (1 + np.exp(-gate)) * up).astype(np_dtype).astype(np.float32)
    scale = np.maximum(np.abs(h).max(axis=1), 1e-12) / 448.0
    return np.clip(h / scale[:, None], -448, 448).astype(E4M3), scale.astype(np.float32)


def e4m3_bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_matches_numpy(dtype):
    y, x_scale, w_scale = make_inputs(24, 96, dtype)
    h, h_scale = swiglu_fp8_reference(y, x_scale, w_scale, dtype=dtype)
    want_h, want_scale = numpy_oracle(y, np.asarray(x_scale), np.asarray(w_scale), dtype)
    np.testing.assert_allclose(np.asarray(h_scale), want_scale, rtol=1e-5)
    # exp differs in its last bits between numpy and XLA: at most a few values round the other way
    same = e4m3_bits(h) == e4m3_bits(want_h)
    assert same.mean() > 0.995, same.mean()
    diff = np.abs(np.asarray(h, np.float32) - want_h.astype(np.float32))
    assert (diff <= np.abs(want_h.astype(np.float32)) / 8 + 1e-30).all()  # one e4m3 step
    assert not e4m3_bits(h)[12].any() and np.asarray(h_scale)[12] > 0  # the zero row: zeros, no NaN


# (rows, F, rows per program): F = 96 is one 32-column chunk x 3; 1536 = 3 x 512; 4864 = 19 x 256
# (Qwen2.5-0.5B); 14336 = 7 x 2048 (Llama-3.1-8B).
SHAPES = [(8, 96, 1), (16, 1536, 2), (4, 4864, 1), (4, 14336, 4)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_rows,width,rows", SHAPES)
def test_interpret_kernel_matches_reference(num_rows, width, rows, dtype):
    y, x_scale, w_scale = make_inputs(num_rows, width, dtype, seed=width)
    h, h_scale = swiglu_fp8_gpu(y, x_scale, w_scale, dtype=dtype, rows=rows, interpret=True)
    want_h, want_scale = swiglu_fp8_reference(y, x_scale, w_scale, dtype=dtype)
    assert h.dtype == jnp.float8_e4m3fn and h.shape == (num_rows, width)
    np.testing.assert_array_equal(e4m3_bits(h), e4m3_bits(want_h))
    np.testing.assert_array_equal(np.asarray(h_scale), np.asarray(want_scale))


def test_bad_shapes_are_clear_errors():
    y, x_scale, w_scale = make_inputs(8, 96, jnp.float32)
    with pytest.raises(ValueError, match="rows=3 must be a power of two dividing T=8"):
        swiglu_fp8_gpu(y, x_scale, w_scale, dtype=jnp.float32, rows=3, interpret=True)
    with pytest.raises(ValueError, match=r"w_scale \[2, 96\]"):
        swiglu_fp8_gpu(y, x_scale, w_scale[:, :48], dtype=jnp.float32, interpret=True)
    assert chunk_size(14336) == 2048 and chunk_size(4864) == 256 and chunk_size(96) == 32
    assert supported(14336) and not supported(4097) and not supported(8 * 129 * 2)  # chunk 16 x 129


@pytest.mark.parametrize("width,rows", [(14336, 1), (14336, 2), (1536, 1)])
def test_kernel_lowers_for_cuda_on_any_host(width, rows):
    # Pallas' Triton lowering (e4m3 stores included) runs at lowering time, on any host.
    args = (jax.ShapeDtypeStruct((256, 2, width), jnp.bfloat16), jax.ShapeDtypeStruct((256,), jnp.float32),
            jax.ShapeDtypeStruct((2, width), jnp.float32))
    op = jax.jit(lambda *a: swiglu_fp8_gpu(*a, dtype=jnp.bfloat16, rows=rows))
    assert "swiglu_fp8" in op.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_rows,width,rows", [(256, 14336, 1), (512, 14336, 2), (128, 4864, 1),
                                                 (64, 1536, 4), (16, 96, 1)])
def test_compiled_kernel_matches_reference(num_rows, width, rows, dtype):
    # The GPU's exp differs from XLA's in its last bits, so a value on a rounding boundary of the
    # model dtype or of e4m3 may round the other way: one e4m3 step at most, rarely.
    y, x_scale, w_scale = make_inputs(num_rows, width, dtype, seed=width)
    h, h_scale = swiglu_fp8_gpu(y, x_scale, w_scale, dtype=dtype, rows=rows)
    want_h, want_scale = swiglu_fp8_reference(y, x_scale, w_scale, dtype=dtype)
    np.testing.assert_allclose(np.asarray(h_scale), np.asarray(want_scale), rtol=1e-2)
    got, want = np.asarray(h, np.float32), np.asarray(want_h, np.float32)
    assert np.isfinite(got).all()
    same = e4m3_bits(h) == e4m3_bits(want_h)
    assert same.mean() > 0.99, same.mean()
    assert (np.abs(got - want) <= np.abs(want) / 8 + 2 ** -9).all()
