"""On-device sampling: penalties → greedy / temperature → min-p, top-k, top-p → seeded draw.

Follows vLLM V1's sampler:
- greedy rows (temperature ≈ 0) take the argmax of the *penalised* logits;
- min-p, top-k and top-p act on the temperature-scaled distribution; min-p and top-k are
  applied first, then top-p on the renormalised survivors (vLLM V1 runs min-p as a logits
  processor before its top-k/top-p step; min-p and top-k commute, as both keep a prefix of
  the sorted order);
- reported log-probs come from the *raw* logits, as vLLM reports by default.

Each row draws with its own key `fold_in(key(seed), step)`, so a row's token depends only on its
seed, step and logits, never on its index or on the other rows of the batch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpaged.sampling_params import GREEDY_TEMPERATURE
from jaxpaged.step_inputs import SamplingTensors


class SampleOutput(NamedTuple):
    token_ids: jax.Array  # [S] int32
    logprobs: jax.Array  # [S] float32, raw log-prob of the sampled token
    top_ids: jax.Array  # [S, num_top_logprobs] int32, highest raw log-probs, descending
    top_logprobs: jax.Array  # [S, num_top_logprobs] float32


def penalize(logits: jax.Array, sampling: SamplingTensors) -> jax.Array:
    """Repetition penalty over prompt + output tokens, then frequency/presence over output only."""
    num_seqs, vocab = logits.shape  # [S, V]
    history = sampling.token_history  # [S, W]
    width = history.shape[1]
    valid = history >= 0  # [S, W]
    is_output = valid & (jnp.arange(width)[None, :] >= sampling.num_prompt_tokens[:, None])  # [S, W]
    # Padding adds weight 0 (its -1 index wraps harmlessly); ids >= V are dropped.
    rows = jnp.broadcast_to(jnp.arange(num_seqs)[:, None], history.shape)  # [S, W]
    counts = jnp.zeros((num_seqs, vocab), jnp.float32)
    seen = counts.at[rows, history].add(valid.astype(jnp.float32), mode="drop") > 0  # [S, V]
    output_counts = counts.at[rows, history].add(is_output.astype(jnp.float32), mode="drop")  # [S, V]

    r = sampling.repetition_penalty[:, None]  # [S, 1]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    logits = logits - sampling.frequency_penalty[:, None] * output_counts
    logits = logits - sampling.presence_penalty[:, None] * (output_counts > 0)
    return logits  # [S, V]


def ban(logits: jax.Array, banned_token_ids: jax.Array) -> jax.Array:
    """Sets banned tokens (EOS and stop ids of requests still under min_tokens) to -inf."""
    num_seqs, vocab = logits.shape
    ids = jnp.where(banned_token_ids >= 0, banned_token_ids, vocab)  # [S, B], padding -> dropped
    rows = jnp.broadcast_to(jnp.arange(num_seqs)[:, None], ids.shape)  # [S, B]
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def _filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Set to -inf every token outside the row's min-p ∩ top-k set, then outside its nucleus."""
    vocab = scaled.shape[1]
    sorted_logits = -jnp.sort(-scaled, axis=-1)  # [S, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [S, V]
    rank = jnp.arange(vocab)[None, :]  # [1, V]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)  # [S]
    keep = (rank < k[:, None]) & (probs >= min_p[:, None] * probs[:, :1])  # [S, V]

    # Nucleus over the survivors, renormalised: keep a token while the mass strictly above it is
    # still short of top_p, i.e. the smallest prefix whose mass reaches top_p.
    kept = jnp.where(keep, probs, 0.0)
    kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
    mass_above = jnp.cumsum(kept, axis=-1) - kept  # [S, V]
    # top_p >= 1 is "off" explicitly: float round-off could otherwise drop the tail.
    keep &= (mass_above < top_p[:, None]) | (top_p[:, None] >= 1.0)
    keep = keep.at[:, 0].set(True)  # always at least the most likely token

    # Every mask keeps a prefix of the sorted order, so one cutoff value per row describes it.
    # Tokens tied with the cutoff are all kept, as in vLLM's top-k.
    num_kept = jnp.sum(keep, axis=-1)  # [S]
    cutoff = jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)  # [S, 1]
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)  # [S, V]


def _draw(scaled: jax.Array, sampling: SamplingTensors, filtered: bool) -> jax.Array:
    # The sort is the costly part: only batches with a filtering row pay for it (a row without
    # one keeps every token through `_filter`).
    if filtered:
        scaled = _filter(scaled, sampling.top_k, sampling.top_p, sampling.min_p)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(
        sampling.seeds, sampling.steps
    )  # [S] typed keys
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)  # [S]


def sample(
    logits: jax.Array,  # [S, V] float32 or bfloat16
    sampling: SamplingTensors,
    *,
    apply_penalties: bool,
    num_top_logprobs: int | None,
    draw: str = "filtered",
) -> SampleOutput:
    """`num_top_logprobs=None`: no request of the batch wants logprobs, so none are computed
    (the log-softmax and the top-k over the vocabulary are a large share of a big batch's
    sampling time); `logprobs` is then zeros and the top arrays are [S, 0].

    `draw` (`sampling_params.draw_kind`, static): "greedy" skips the noise and the sort, "random"
    the sort; "filtered" is right for any batch. The host picks it, so the program has no
    data-dependent branch."""
    logits = raw_logits = logits.astype(jnp.float32)  # [S, V]
    if apply_penalties:
        logits = penalize(logits, sampling)
    logits = ban(logits, sampling.banned_token_ids)

    greedy = sampling.temperature < GREEDY_TEMPERATURE  # [S]
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [S]
    temperature = jnp.where(greedy, 1.0, sampling.temperature)  # [S], no division by ~0
    scaled = logits / temperature[:, None]  # [S, V]
    if draw == "greedy":
        token_ids = greedy_ids
    else:
        random_ids = _draw(scaled, sampling, filtered=draw == "filtered")
        token_ids = jnp.where(greedy, greedy_ids, random_ids)  # [S]

    if num_top_logprobs is None:
        num_seqs = token_ids.shape[0]
        return SampleOutput(token_ids, jnp.zeros((num_seqs,), jnp.float32),
                            jnp.zeros((num_seqs, 0), jnp.int32), jnp.zeros((num_seqs, 0), jnp.float32))
    raw_logprobs = jax.nn.log_softmax(raw_logits, axis=-1)  # [S, V]
    logprobs = jnp.take_along_axis(raw_logprobs, token_ids[:, None], axis=-1)[:, 0]  # [S]
    top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, num_top_logprobs)  # [S, N] each
    return SampleOutput(token_ids, logprobs, top_ids.astype(jnp.int32), top_logprobs)


sample_jit = jax.jit(sample, static_argnames=("apply_penalties", "num_top_logprobs", "draw"))
