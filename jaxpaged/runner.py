"""The device side of a step: one jitted forward per token bucket, one jitted sampler.

The runner owns the params and the paged KV cache (one array per layer, donated through the jit so
XLA updates it in place). Everything it is given per step is a `StepInputs` of fixed shape, so after
`warmup()` compiled every bucket, serving never compiles again.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.attention import get_kv_cache_shape, make_attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.llama import forward
from jaxpaged.sampler import SampleOutput, sample
from jaxpaged.sampling_params import MAX_LOGPROBS
from jaxpaged.step_inputs import StepInputs, build_step_inputs

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations while active (the recompilation tripwire)."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


class ModelRunner:
    def __init__(self, config: ModelConfig, params: dict, *, num_pages: int, page_size: int,
                 max_num_seqs: int, pages_per_seq: int, max_model_len: int,
                 token_buckets: tuple[int, ...], attention_backend: str, kv_dtype):
        self.config = config
        self.params = params
        self.max_num_seqs = max_num_seqs
        self.pages_per_seq = pages_per_seq
        self.max_model_len = max_model_len
        self.token_buckets = token_buckets
        platform = jax.devices()[0].platform
        shape = get_kv_cache_shape(num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.kv_pages = [jnp.zeros(shape, kv_dtype) for _ in range(config.num_layers)]
        attention = make_attention(attention_backend, platform=platform,
                                   sm_scale=config.head_dim ** -0.5,
                                   sliding_window=config.sliding_window)
        self._forward = jax.jit(functools.partial(forward, config=config, attention=attention),
                                donate_argnames=("kv_pages",))
        self._sample = jax.jit(sample, static_argnames=("apply_penalties", "num_top_logprobs"))

    def history_width(self, apply_penalties: bool) -> int:
        return self.max_model_len if apply_penalties else 1

    def execute(self, inputs: StepInputs, *, apply_penalties: bool) -> SampleOutput:
        """Runs one step; returns the sampled tokens and logprobs as numpy arrays."""
        logits, self.kv_pages = self._forward(self.params, self.kv_pages, inputs.token_ids,
                                              inputs.attention)
        out = self._sample(logits, inputs.sampling, apply_penalties=apply_penalties,
                           num_top_logprobs=MAX_LOGPROBS)
        return SampleOutput(*jax.device_get(tuple(out)))

    def warmup(self) -> tuple[int, float]:
        """Compiles every bucket and both sampler variants; returns (compiles, seconds)."""
        start = time.perf_counter()
        with CompileCounter() as counter:
            for bucket in self.token_buckets:
                for apply_penalties in (False, True):
                    if apply_penalties and bucket != self.token_buckets[0]:
                        continue  # the sampler does not depend on the bucket
                    inputs = build_step_inputs(
                        [], [], token_bucket=bucket, max_num_seqs=self.max_num_seqs,
                        pages_per_seq=self.pages_per_seq,
                        history_width=self.history_width(apply_penalties))
                    self.execute(inputs, apply_penalties=apply_penalties)
        return counter.count, time.perf_counter() - start


def kv_bytes_per_page(config: ModelConfig, page_size: int, itemsize: int) -> int:
    return config.num_layers * page_size * 2 * config.num_kv_heads * config.head_dim * itemsize


def device_kv_budget(params: dict, utilization: float) -> int | None:
    """Bytes left for the KV cache on the accelerator, or None where the device can't say (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    # Keep a slice back for the compiled programs' activations and workspace.
    reserve = max(int(0.05 * stats["bytes_limit"]), 1 << 30)
    return int(stats["bytes_limit"] * utilization) - stats.get("bytes_in_use", 0) - reserve


def to_numpy_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))
