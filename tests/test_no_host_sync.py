"""A step's programs, lowered for CUDA, hold no data-dependent control flow.

XLA's GPU runtime evaluates a `cond` predicate or a `while` condition on the host: it copies the
value back and waits for the stream, i.e. for everything queued before it. One such branch in the
forward or the sampler makes `runner.dispatch` block until the step is done, so async scheduling
overlaps nothing (measured on the H100: benchmarks/results/dispatch_probe_h100.md). Lowering for
CUDA works on a CPU-only machine, so this tripwire runs in CI. The reference attention, which does
loop on data, shows that the check sees such loops.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxpaged.attention import get_kv_cache_shape, make_attention
from jaxpaged.config import ModelConfig
from jaxpaged.models.params import random_params
from jaxpaged.models import quant
from jaxpaged.runner import SAMPLER_VARIANTS, _packed_forward_step, _sample_step, pick_fp8_ops
from jaxpaged.sampling_params import MAX_LOGPROBS
from jaxpaged.step_inputs import build_step_inputs, forward_arrays, pack

CONTROL_FLOW = ("stablehlo.while", "stablehlo.if", "stablehlo.case")
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512}
MAX_NUM_SEQS, PAGES_PER_SEQ = 4, 4


def control_flow(lowered) -> list[str]:
    text = lowered.as_text()
    return [op for op in CONTROL_FLOW if op in text]


def lower_forward(backend: str, decode_only: bool = False, quantization: str | None = None):
    config = ModelConfig.from_hf_config(TINY)
    attention = make_attention(backend, platform="gpu", sm_scale=config.head_dim ** -0.5,
                               sliding_window=None, decode_only=decode_only)
    forward = jax.jit(functools.partial(_packed_forward_step, config=config, attention=attention,
                                        fp8_ops=pick_fp8_ops("gpu", config, 1)),
                      static_argnums=(4,))
    shape = get_kv_cache_shape(32, 16, config.num_kv_heads, config.head_dim)
    kv_pages = [jnp.zeros(shape, jnp.bfloat16)] * config.num_layers
    inputs = build_step_inputs([], [], token_bucket=16, max_num_seqs=MAX_NUM_SEQS,
                               pages_per_seq=PAGES_PER_SEQ, history_width=1)
    params = random_params(config, jnp.bfloat16, quantization=quantization)
    buffer, layout = pack(forward_arrays(inputs))
    return forward.trace(params, kv_pages, buffer, jnp.zeros(MAX_NUM_SEQS, jnp.int32),
                         layout).lower(lowering_platforms=("cuda",))


def test_gpu_forward_has_no_data_dependent_control_flow():
    assert control_flow(lower_forward("pallas")) == []
    assert control_flow(lower_forward("pallas", decode_only=True)) == []
    assert "stablehlo.while" in control_flow(lower_forward("reference"))  # the check sees loops


def test_gpu_fp8_forward_has_no_data_dependent_control_flow(monkeypatch):
    # e4m3 activations in the 16-token bucket: the FP8 GEMMs and the row kernels between them
    monkeypatch.setattr(quant, "FP8_ACTIVATION_MIN_ROWS", 1)
    lowered = lower_forward("pallas", quantization="fp8")
    assert control_flow(lowered) == []
    text = lowered.as_text()
    assert all(name in text for name in ("swiglu_fp8", "add_rms_norm_fp8", "quantize_fp8"))


@pytest.mark.parametrize("apply_penalties,with_logprobs,draw", SAMPLER_VARIANTS)
def test_sampler_variants_have_no_data_dependent_control_flow(apply_penalties, with_logprobs, draw):
    width = 8 if apply_penalties else 1
    sampling = build_step_inputs([], [], token_bucket=16, max_num_seqs=MAX_NUM_SEQS,
                                 pages_per_seq=PAGES_PER_SEQ, history_width=width).sampling
    buffer, layout = pack(sampling)
    lowered = jax.jit(functools.partial(_sample_step, num_rows=MAX_NUM_SEQS),
                      static_argnames=("layout", "apply_penalties", "num_top_logprobs", "draw")).trace(
        jnp.zeros((MAX_NUM_SEQS, TINY["vocab_size"]), jnp.float32), buffer, layout=layout,
        apply_penalties=apply_penalties, num_top_logprobs=MAX_LOGPROBS if with_logprobs else None,
        draw=draw).lower(lowering_platforms=("cuda",))
    assert control_flow(lowered) == []
