"""The Llama family as a pure function: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

These share one decoder; the differences are config flags rather than code paths worth a file
each: Qwen2 adds q/k/v biases, Qwen3 RMS-normalises q and k per head before rope, Mistral may use
a sliding window, Llama 3.1+ scales rope frequencies.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpaged.config import ModelConfig
from jaxpaged.models.layers import add, add_rms_norm, rms_norm, rope_cos_sin, rope_inv_freq, swiglu_mlp
from jaxpaged.models.params import split_qkv
from jaxpaged.models.quant import Fp8Ops, linear, project, quantizes_activations
from jaxpaged.step_inputs import AttentionMetadata

# attention(q [T,Hq,D], k [T,Hkv,D], v [T,Hkv,D], kv_pages, metadata, rope=(cos, sin) [T,D] each,
#   counts) -> (out [T,Hq,D], kv_pages, counts); q and k go in unrotated, counts (the decode
#   kernel's split counters, or None) go from layer to layer (jaxpaged.attention.make_attention)
AttentionFn = Callable


def forward(params: dict, kv_pages: list, token_ids, metadata: AttentionMetadata, *,
            config: ModelConfig, attention: AttentionFn, fp8_ops: Fp8Ops = Fp8Ops()):
    """One step over a ragged batch: returns logits at each sequence's last token and the cache.

    token_ids [T] int32; kv_pages: one array per layer in the attention backend's layout.
    Returns (logits [S, vocab] float32, hidden [T, D], new kv_pages). `hidden` holds the
    final-normed states of every scheduled token, for prompt logprobs (see `token_logprobs`).
    `fp8_ops`: the row-wise ops between GEMMs where activations are e4m3 (`quant.Fp8Ops`: the
    jnp references, or the GPU kernels the runner picks).
    """
    hd, eps = config.head_dim, config.rms_norm_eps
    inv_freq = rope_inv_freq(hd, config.rope_theta, dict(config.rope_scaling))
    cos, sin = rope_cos_sin(metadata.positions, inv_freq)  # [T, hd] each

    # The residual stream x and what the last block adds to it: each add happens in one op with
    # the norm after it (with FP8 activations, also the next GEMM's quantization).
    x, delta = params["embed"][token_ids], None  # [T, D]
    new_pages, counts = [], None
    # A Python loop: the layers unroll over per-layer weights and per-layer donated caches, which
    # XLA updates in place (a scan over stacked layers copies weights or caches every step). Each
    # layer is a call of one jitted function, so a program traces and lowers the layer once (twice:
    # the first has no residual delta or counters yet) instead of once a layer; XLA inlines the
    # calls before it optimises, so the compiled program is the same.
    for i, (layer, pages) in enumerate(zip(params["layers"], kv_pages)):
        with jax.named_scope(f"layer_{i}"):
            x, delta, pages, counts = decoder_layer(
                layer, pages, x, delta, (cos, sin), metadata, counts, config=config,
                attention=attention, fp8_ops=fp8_ops)
        new_pages.append(pages)
    x = add(x, delta)

    # RMS norm is per row, so norming every token then gathering equals gathering then norming.
    hidden = rms_norm(x, params["final_norm"], eps)  # [T, D]
    logits = jnp.dot(hidden[metadata.logits_indices], lm_head_of(params),
                     preferred_element_type=jnp.float32)  # [S, vocab]
    return logits, hidden, new_pages


@functools.partial(jax.jit, static_argnames=("config", "attention", "fp8_ops"))
def decoder_layer(layer: dict, pages, x, delta, rope, metadata: AttentionMetadata, counts, *,
                  config: ModelConfig, attention: AttentionFn, fp8_ops: Fp8Ops):
    """One decoder block: x [T, D] the residual stream before `delta` [T, D] (or None) is added
    to it. Returns (x, the block's delta, its kv pages, the attention's counts)."""
    num_tokens = x.shape[0]
    hd, eps = config.head_dim, config.rms_norm_eps
    x, h = add_rms_norm(x, delta, layer["input_norm"], eps, ops=fp8_ops,
                        quantize=quantizes_activations(x, layer["qkv_proj"]))
    qkv = linear(h, layer["qkv_proj"])  # [T, Hkv * (G + 2) * hd]: q, k, v by KV head
    if config.qkv_bias:
        qkv = qkv + layer["qkv_bias"]
    q, k, v = split_qkv(qkv, num_q_heads=config.num_q_heads, num_kv_heads=config.num_kv_heads,
                        head_dim=hd)
    if config.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], eps), rms_norm(k, layer["k_norm"], eps)
    # attention rotates q and k by rope's (cos, sin) (in its kernel where the backend can)
    out, pages, counts = attention(q, k, v, pages, metadata, rope=rope, counts=counts)  # [T, Hq, hd]
    delta = project(out.reshape(num_tokens, -1), layer["o_proj"], fp8_ops)
    x, h = add_rms_norm(x, delta, layer["post_norm"], eps, ops=fp8_ops,
                        quantize=quantizes_activations(x, layer["gate_up_proj"]))
    return x, swiglu_mlp(h, layer["gate_up_proj"], layer["down_proj"], fp8_ops), pages, counts


def lm_head_of(params: dict):
    return params["lm_head"] if "lm_head" in params else params["embed"].T  # [D, vocab]


def token_logprobs(params: dict, hidden, target_ids, *, num_top: int):
    """Log-probs over the vocabulary for final-normed hidden rows, in float32.

    hidden [R, D]; target_ids [R] int32. Returns (target logprobs [R], top ids [R, num_top] int32,
    top logprobs [R, num_top]), top entries in descending order.
    """
    logits = jnp.dot(hidden, lm_head_of(params), preferred_element_type=jnp.float32)  # [R, vocab]
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [R, vocab]
    target = jnp.take_along_axis(logprobs, target_ids[:, None], axis=-1)[:, 0]  # [R]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)  # [R, num_top] each
    return target, top_ids.astype(jnp.int32), top_logprobs
