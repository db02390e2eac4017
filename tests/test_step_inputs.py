"""A step's inputs travel to the device packed into one int32 buffer (`step_inputs.pack`) and the
programs cut them back (`runner.unpack`): every array must come back bit for bit, whatever its
dtype and shape, and a buffer that does not fit its layout is refused."""

import jax
import numpy as np
import pytest

from jaxpaged.runner import unpack
from jaxpaged.step_inputs import SamplingTensors, empty_sampling_tensors, forward_arrays, pack


def test_pack_then_unpack_returns_every_array_bit_for_bit():
    rng = np.random.default_rng(0)
    sampling = empty_sampling_tensors(5, 7)._replace(
        temperature=rng.standard_normal(5).astype(np.float32),
        top_p=np.array([1.0, np.nan, -0.0, np.inf, 1e-38], np.float32),
        seeds=np.array([0, 1, 2**31, 2**32 - 1, 12345], np.uint32),
        token_history=rng.integers(-1, 50_000, (5, 7), dtype=np.int32),
        banned_token_ids=rng.integers(-1, 9, (5, 16), dtype=np.int32))
    buffer, layout = pack(sampling)
    assert buffer.dtype == np.int32 and buffer.ndim == 1
    got = SamplingTensors(*jax.jit(unpack, static_argnums=1)(buffer, layout))
    for name, want, have in zip(SamplingTensors._fields, sampling, got):
        have = np.asarray(have)
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert have.tobytes() == want.tobytes(), name  # bits: NaN and -0.0 included


def test_forward_arrays_round_trip_through_a_step():
    from jaxpaged.step_inputs import build_step_inputs

    inputs = build_step_inputs([], [], token_bucket=16, max_num_seqs=4, pages_per_seq=3,
                               history_width=1)
    inputs = inputs._replace(token_ids=np.arange(16, dtype=np.int32) * 7,
                             attention=inputs.attention._replace(
                                 page_indices=np.arange(12, dtype=np.int32).reshape(4, 3)))
    buffer, layout = pack(forward_arrays(inputs))
    for want, have in zip(forward_arrays(inputs), unpack(buffer, layout)):
        np.testing.assert_array_equal(np.asarray(have), want)


def test_a_buffer_that_does_not_fit_its_layout_is_refused():
    buffer, layout = pack([np.zeros(3, np.int32), np.ones((2, 2), np.float32)])
    with pytest.raises(ValueError, match="packed buffer of 6 values for a layout of 7"):
        unpack(buffer[:6], layout)
    with pytest.raises(TypeError, match="4-byte"):
        pack([np.zeros(3, np.int64)])
