"""Row-wise ops around FP8 GEMMs (`pallas_kernels.fp8_activations`): the jnp references against
numpy oracles (ml_dtypes' rounding), the Pallas kernels against the references in interpret mode
(CPU) and compiled (GPU-marked), and their CUDA lowering on any host."""

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from pallas_kernels.fp8_activations import (add_rms_norm_fp8_gpu, add_rms_norm_fp8_reference,
                                            chunk_size, quantize_fp8_gpu, quantize_rows, supported,
                                            swiglu_fp8_gpu, swiglu_fp8_reference)

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
    with pytest.raises(ValueError, match="rows=3 must be a power of two"):
        swiglu_fp8_gpu(y, x_scale, w_scale, dtype=jnp.float32, rows=3, interpret=True)
    with pytest.raises(ValueError, match=r"expected shapes .*'w_scale': \(2, 96\)"):
        swiglu_fp8_gpu(y, x_scale, w_scale[:, :48], dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="width with a power-of-two factor"):
        quantize_fp8_gpu(jnp.zeros((8, 4097)), interpret=True)
    assert chunk_size(14336) == 2048 and chunk_size(4864) == 256 and chunk_size(96) == 32
    assert supported(14336) and not supported(4097) and not supported(8 * 129 * 2)  # chunk 16 x 129


def make_add_norm_inputs(num_rows: int, width: int, dtype, seed: int = 0):
    """A residual stream, an output projection's raw e4m3 product with its scales, a norm weight;
    one padding row (zeros everywhere)."""
    rng = np.random.default_rng(seed)
    residual = rng.standard_normal((num_rows, width)).astype(np.float32)
    y = (rng.standard_normal((num_rows, width)) * 3000).astype(np.float32)
    residual[num_rows // 2] = y[num_rows // 2] = 0.0
    x_scale = rng.uniform(1e-3, 2e-2, num_rows).astype(np.float32)
    w_scale = rng.uniform(1e-4, 2e-3, width).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, width).astype(np.float32)
    return (jnp.asarray(residual, dtype), jnp.asarray(y, dtype), jnp.asarray(x_scale), jnp.asarray(w_scale),
            jnp.asarray(norm, dtype))


def numpy_add_norm_oracle(residual, y, x_scale, w_scale, norm, eps, dtype):
    """The unfused layer in numpy: x + the scaled product in the model dtype, then Hugging Face's
    RMSNorm (float32, weight applied, cast back), then each row quantized to e4m3."""
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    delta = (np.asarray(y, np.float32) * x_scale[:, None] * w_scale[None]).astype(np_dtype)
    x = (np.asarray(residual, np.float32) + delta.astype(np.float32)).astype(np_dtype).astype(np.float32)
    normed = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps)
    h = (np.asarray(norm, np.float32) * normed).astype(np_dtype).astype(np.float32)
    scale = np.maximum(np.abs(h).max(axis=1), 1e-12) / 448.0
    return x, np.clip(h / scale[:, None], -448, 448).astype(E4M3), scale.astype(np.float32)


def assert_e4m3_close(got, want, min_same: float):
    """Equal e4m3 bytes but for values on a rounding boundary: one e4m3 step at most, rarely."""
    same = e4m3_bits(got) == e4m3_bits(want)
    assert same.mean() >= min_same, same.mean()
    got32, want32 = np.asarray(got, np.float32), np.asarray(want).astype(np.float32)
    assert np.isfinite(got32).all()
    assert (np.abs(got32 - want32) <= np.abs(want32) / 8 + 2 ** -9).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_rms_norm_reference_matches_numpy(dtype):
    args = make_add_norm_inputs(24, 256, dtype)
    x, h, h_scale = add_rms_norm_fp8_reference(*args, eps=1e-5)
    want_x, want_h, want_scale = numpy_add_norm_oracle(*args[:2], np.asarray(args[2]), np.asarray(args[3]),
                                                       args[4], 1e-5, dtype)
    np.testing.assert_allclose(np.asarray(x, np.float32), want_x, rtol=1e-6 if dtype == jnp.float32 else 1e-2)
    np.testing.assert_allclose(np.asarray(h_scale), want_scale, rtol=1e-5 if dtype == jnp.float32 else 1e-2)
    assert_e4m3_close(h, want_h, 0.99)
    assert not e4m3_bits(h)[12].any()  # the padding row: zeros, no NaN


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_rows,width,rows", [(16, 128, 4), (32, 1536, 2), (8, 4096, 4), (12, 576, 4)])
def test_interpret_add_rms_norm_matches_reference(num_rows, width, rows, dtype):
    args = make_add_norm_inputs(num_rows, width, dtype, seed=width)
    x, h, h_scale = add_rms_norm_fp8_gpu(*args, eps=1e-5, rows=rows, interpret=True)
    want_x, want_h, want_scale = add_rms_norm_fp8_reference(*args, eps=1e-5)
    assert x.dtype == dtype and h.dtype == jnp.float8_e4m3fn
    # float32: XLA may fuse the scale-and-add into one FMA in one of the two: last-bit differences
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(want_x, np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h_scale), np.asarray(want_scale), rtol=1e-6)
    assert_e4m3_close(h, want_h, 0.999)


@pytest.mark.parametrize("num_rows,width,rows", [(16, 128, 4), (8, 4096, 2), (12, 576, 4)])
def test_interpret_quantize_matches_reference(num_rows, width, rows):
    x = jnp.asarray(np.random.default_rng(width).standard_normal((num_rows, width)) * 5, jnp.bfloat16)
    x = x.at[1].set(0)
    h, h_scale = quantize_fp8_gpu(x, rows=rows, interpret=True)
    want_h, want_scale = quantize_rows(x)
    np.testing.assert_array_equal(e4m3_bits(h), e4m3_bits(want_h))
    np.testing.assert_array_equal(np.asarray(h_scale), np.asarray(want_scale))


def shapes(*pairs):
    return tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in pairs)


F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.mark.parametrize("name,op,args", [
    ("swiglu_fp8", lambda *a: swiglu_fp8_gpu(*a, dtype=BF16, rows=1),
     shapes(((256, 2, 14336), BF16), ((256,), F32), ((2, 14336), F32))),
    ("swiglu_fp8", lambda *a: swiglu_fp8_gpu(*a, dtype=BF16, rows=2),
     shapes(((256, 2, 1536), BF16), ((256,), F32), ((2, 1536), F32))),
    ("add_rms_norm_fp8", lambda *a: add_rms_norm_fp8_gpu(*a, eps=1e-5),
     shapes(((256, 4096), BF16), ((256, 4096), BF16), ((256,), F32), ((4096,), F32), ((4096,), BF16))),
    ("quantize_fp8", quantize_fp8_gpu, shapes(((256, 4096), BF16))),
])
def test_kernels_lower_for_cuda_on_any_host(name, op, args):
    # Pallas' Triton lowering (e4m3 stores included) runs at lowering time, on any host.
    assert name in jax.jit(op).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_rows,width,rows", [(256, 4096, 4), (512, 4096, 1), (128, 576, 4), (64, 1536, 2)])
def test_compiled_add_rms_norm_and_quantize_match_reference(num_rows, width, rows, dtype):
    args = make_add_norm_inputs(num_rows, width, dtype, seed=width)
    x, h, h_scale = add_rms_norm_fp8_gpu(*args, eps=1e-5, rows=rows)
    want_x, want_h, want_scale = add_rms_norm_fp8_reference(*args, eps=1e-5)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # a bf16 sum may round the other way
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(want_x, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(h_scale), np.asarray(want_scale), rtol=1e-2)
    assert_e4m3_close(h, want_h, 0.99)
    q, q_scale = quantize_fp8_gpu(args[0], rows=rows)
    want_q, want_q_scale = quantize_rows(args[0])
    np.testing.assert_array_equal(np.asarray(q_scale), np.asarray(want_q_scale))
    assert_e4m3_close(q, want_q, 0.999)
