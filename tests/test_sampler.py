"""Sampler tests against independent numpy oracles (never against the module itself)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.sampler import penalize, sample_jit
from jaxpaged.step_inputs import empty_sampling_tensors


def make_sampling(num_seqs, history=None, num_prompt_tokens=None, **fields):
    """SamplingTensors with defaults off; scalar fields broadcast to every row."""
    history = np.full((num_seqs, 1), -1, np.int32) if history is None else np.asarray(history, np.int32)
    st = empty_sampling_tensors(num_seqs, history.shape[1])
    updates = {"token_history": history}
    if num_prompt_tokens is not None:
        updates["num_prompt_tokens"] = np.asarray(num_prompt_tokens, np.int32)
    for name, value in fields.items():
        dtype = getattr(st, name).dtype
        updates[name] = np.broadcast_to(np.asarray(value, dtype), (num_seqs,)).copy()
    return st._replace(**updates)


def run(logits, sampling, *, apply_penalties=False, num_top_logprobs=0):
    out = sample_jit(jnp.asarray(logits), sampling, apply_penalties=apply_penalties,
                     num_top_logprobs=num_top_logprobs)
    return [np.asarray(x) for x in out]


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_penalize(logits, history, num_prompt, rep, freq, pres):
    out = logits.astype(np.float64).copy()
    for i in range(out.shape[0]):
        row = [t for t in history[i] if t >= 0]
        prompt, output = row[: num_prompt[i]], row[num_prompt[i]:]
        for t in set(prompt) | set(output):
            out[i, t] = out[i, t] / rep[i] if out[i, t] > 0 else out[i, t] * rep[i]
        for t in set(output):
            out[i, t] -= freq[i] * output.count(t) + pres[i]
    return out


def test_greedy_matches_argmax_and_mixes_with_random_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 50)).astype(np.float32)
    temperature = np.array([0, 1, 0, 0.7, 0, 1e-6, 2.0, 0], np.float32)
    sampling = make_sampling(8, temperature=temperature, seeds=np.arange(8))
    ids, *_ = run(logits, sampling)
    greedy = temperature < 1e-5
    np.testing.assert_array_equal(ids[greedy], logits[greedy].argmax(-1))
    assert ids.dtype == np.int32 and ((ids >= 0) & (ids < 50)).all()
    # Random rows with flat logits must not all collapse onto the argmax.
    flat = np.zeros((64, 50), np.float32)
    flat[:, 7] = 0.1
    ids, *_ = run(flat, make_sampling(64, temperature=1.0, seeds=np.arange(64)))
    assert len(set(ids.tolist())) > 20


def test_bf16_logits_are_accepted():
    logits = np.random.default_rng(1).normal(size=(4, 30)).astype(np.float32)
    ids, lp, *_ = run(jnp.asarray(logits, jnp.bfloat16), make_sampling(4))
    as_bf16 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(ids, as_bf16.argmax(-1))
    assert lp.dtype == np.float32


def test_penalized_logits_match_numpy():
    rng = np.random.default_rng(2)
    s, v, w = 6, 40, 12
    logits = rng.normal(scale=3.0, size=(s, v)).astype(np.float32)
    history = rng.integers(0, v, size=(s, w)).astype(np.int32)
    history[:, 9:] = -1  # trailing padding
    history[5] = -1  # a padding row
    num_prompt = np.array([4, 0, 9, 2, 6, 0], np.int32)
    rep = np.array([1.3, 1.0, 2.0, 0.8, 1.5, 1.2], np.float32)
    freq = np.array([0.5, 1.0, 0.0, -0.3, 0.2, 0.4], np.float32)
    pres = np.array([0.7, 0.0, 1.0, 0.5, -0.2, 0.9], np.float32)
    sampling = make_sampling(s, history, num_prompt, repetition_penalty=rep,
                             frequency_penalty=freq, presence_penalty=pres)
    got = np.asarray(penalize(jnp.asarray(logits), sampling))
    want = np_penalize(logits, history, num_prompt, rep, freq, pres)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_penalties_flip_greedy_choice_and_prompt_tokens_skip_frequency_presence():
    v = 10
    logits = np.zeros((4, v), np.float32)
    logits[:, 3] = 2.0  # favourite, repeated in the history
    logits[:, 5] = 1.5  # runner-up
    logits[:, 1] = -1.0
    # Row 0: token 3 only in the prompt; repetition 2.0 → 1.0 < 1.5, flips to 5.
    # Row 1: token 3 only in the prompt; frequency/presence must NOT touch it → stays 3.
    # Row 2: token 3 twice in the output; freq 0.2*2 + pres 0.2 = 0.6 → 1.4 < 1.5, flips to 5.
    # Row 3: penalties off → 3.
    history = np.array([[3, 3, -1], [3, 3, -1], [0, 3, 3], [3, 3, 3]], np.int32)
    num_prompt = np.array([2, 2, 1, 3], np.int32)
    rep = np.array([2.0, 1.0, 1.0, 1.0], np.float32)
    freq = np.array([0.0, 5.0, 0.2, 0.0], np.float32)
    pres = np.array([0.0, 5.0, 0.2, 0.0], np.float32)
    sampling = make_sampling(4, history, num_prompt, repetition_penalty=rep,
                             frequency_penalty=freq, presence_penalty=pres)
    ids, *_ = run(logits, sampling, apply_penalties=True)
    want = np_penalize(logits, history, num_prompt, rep, freq, pres).argmax(-1)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(ids, [5, 3, 5, 3])
    # Negative logits are multiplied by the repetition penalty (pushed further down).
    neg = np.full((1, v), -5.0, np.float32)
    neg[0, 1] = -1.0
    neg[0, 2] = -1.5
    ids, *_ = run(neg, make_sampling(1, [[1]], [1], repetition_penalty=2.0), apply_penalties=True)
    assert ids[0] == 2
    # Without apply_penalties the same history is ignored.
    ids, *_ = run(logits, sampling, apply_penalties=False)
    np.testing.assert_array_equal(ids, [3, 3, 3, 3])


def test_top_k_one_and_tiny_top_p_are_argmax():
    rng = np.random.default_rng(3)
    n = 256
    logits = np.repeat(rng.normal(size=(1, 64)).astype(np.float32), n, axis=0)
    best = logits[0].argmax()
    for name, value, off in (("top_k", 1, 0), ("top_p", 1e-6, 1.0), ("min_p", 0.999, 0.0)):
        # Filtered rows share the batch with unfiltered and greedy rows, which must not switch
        # the filter off for the rest.
        values = np.where(np.arange(n) % 2 == 0, value, off)
        temperature = np.where(np.arange(n) == 1, 0.0, 1.5)
        sampling = make_sampling(n, temperature=temperature, seeds=np.arange(n), **{name: values})
        ids, *_ = run(logits, sampling)
        assert (ids[::2] == best).all(), name
        assert (ids[1::2] != best).any(), name


def nucleus(probs, top_p):
    order = np.argsort(-probs)
    mass_above = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_above < top_p].tolist())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_filtered_samples_stay_inside_numpy_sets(temperature):
    rng = np.random.default_rng(4)
    n, v = 2000, 32
    row = rng.normal(scale=1.5, size=v).astype(np.float32)
    logits = np.repeat(row[None], n, axis=0)
    probs = np_softmax(row / temperature)
    order = np.argsort(-probs)

    def draw(**fields):
        sampling = make_sampling(n, temperature=temperature, seeds=np.arange(n) + 7, **fields)
        return set(run(logits, sampling)[0].tolist())

    top5 = set(order[:5].tolist())
    got = draw(top_k=5)
    assert got <= top5 and len(got) >= 4

    top_p = 0.6
    cum = np.cumsum(probs[order])
    assert np.abs(cum - top_p).min() > 1e-3  # the boundary is not a float coin-flip
    want = nucleus(probs, top_p)
    got = draw(top_p=top_p)
    assert n * min(probs[t] for t in want) > 20  # every nucleus token is drawn w.h.p.
    assert got == want and len(want) < v

    min_p = 0.2
    want = set(np.nonzero(probs >= min_p * probs.max())[0].tolist())
    got = draw(min_p=min_p)
    assert got <= want and len(want) < v

    # Combined: min-p and top-k first, then top-p over the renormalised survivors.
    survivors = np.array([t for t in order[:8] if probs[t] >= 0.05 * probs.max()])
    renorm = np.zeros(v)
    renorm[survivors] = probs[survivors] / probs[survivors].sum()
    want = nucleus(renorm, 0.7) & set(survivors.tolist())
    got = draw(top_k=8, min_p=0.05, top_p=0.7)
    assert got <= want

    # top_k >= V and top_k = 0 are "off": all tokens reachable with a flat distribution.
    flat = np.zeros((n, v), np.float32)
    for k in (0, v, v + 10):
        ids, *_ = run(flat, make_sampling(n, temperature=1.0, seeds=np.arange(n), top_k=k))
        assert len(set(ids.tolist())) == v


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    n, v = 4000, 8
    row = np.array([0.5, -1.0, 1.2, 0.0, -0.3, 0.8, -2.0, 0.3], np.float32)
    ids, *_ = run(np.repeat(row[None], n, axis=0),
                  make_sampling(n, temperature=temperature, seeds=np.arange(n)))
    freq = np.bincount(ids, minlength=v) / n
    p = np_softmax(row / temperature)
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(freq - p) < 4.5 * sigma + 1e-4).all(), (freq, p)
    # And it must be distinguishable from the other temperature's distribution.
    other = np_softmax(row / (1.5 - temperature))
    assert (np.abs(freq - other) > 4.5 * sigma).any()


def test_same_seed_and_step_give_same_token_regardless_of_row_and_batch():
    rng = np.random.default_rng(5)
    v = 300
    row = rng.normal(size=v).astype(np.float32)
    alone = make_sampling(1, temperature=0.9, top_p=0.95, seeds=1234, steps=17)
    ids_alone, lp_alone, *_ = run(row[None], alone)

    s = 8
    logits = rng.normal(size=(s, v)).astype(np.float32)
    logits[5] = row
    temperature = rng.uniform(0.3, 2.0, size=s).astype(np.float32)
    temperature[5] = 0.9
    top_p = np.full(s, 0.5, np.float32)
    top_p[5] = 0.95
    seeds = np.arange(s) + 1000
    seeds[5] = 1234
    steps = np.arange(s)
    steps[5] = 17
    batch = make_sampling(s, temperature=temperature, top_p=top_p, top_k=np.arange(s) * 3,
                          seeds=seeds, steps=steps)
    ids_batch, lp_batch, *_ = run(logits, batch)
    assert ids_batch[5] == ids_alone[0]
    np.testing.assert_allclose(lp_batch[5], lp_alone[0], rtol=1e-6)

    # Over many seeds the property holds too (not just a lucky draw).
    n = 64
    wide = make_sampling(n, temperature=1.0, seeds=np.arange(n), steps=3)
    ids_all, *_ = run(np.repeat(row[None], n, axis=0), wide)
    for i in (0, 13, 63):
        one, *_ = run(row[None], make_sampling(1, temperature=1.0, seeds=i, steps=3))
        assert one[0] == ids_all[i]


def test_different_steps_give_different_draws():
    v, n = 1000, 16
    sampling = make_sampling(n, temperature=1.0, seeds=42, steps=np.arange(n))
    ids, *_ = run(np.zeros((n, v), np.float32), sampling)
    assert len(set(ids.tolist())) >= n - 2
    same, *_ = run(np.zeros((n, v), np.float32), make_sampling(n, temperature=1.0, seeds=42, steps=5))
    assert len(set(same.tolist())) == 1


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(6)
    s, v, k = 6, 100, 5
    logits = rng.normal(scale=2.0, size=(s, v)).astype(np.float32)
    history = rng.integers(0, v, size=(s, 10)).astype(np.int32)
    sampling = make_sampling(s, history, [3] * s, temperature=[0, 0.7, 1.3, 0, 1.0, 0.5],
                             top_k=[0, 5, 0, 0, 3, 0], repetition_penalty=1.5,
                             frequency_penalty=0.5, presence_penalty=0.5, seeds=np.arange(s))
    ids, lp, top_ids, top_lp = run(logits, sampling, apply_penalties=True, num_top_logprobs=k)
    want = np_log_softmax(logits)
    np.testing.assert_allclose(lp, want[np.arange(s), ids], atol=1e-5)
    np.testing.assert_array_equal(top_ids, np.argsort(-want, axis=-1)[:, :k])
    np.testing.assert_allclose(top_lp, np.sort(want, axis=-1)[:, ::-1][:, :k], atol=1e-5)
    assert top_ids.dtype == np.int32 and top_lp.dtype == np.float32


def test_padding_rows_produce_no_nan():
    s, v = 4, 20
    logits = np.random.default_rng(7).normal(size=(s, v)).astype(np.float32)
    logits[3] = 0.0
    sampling = make_sampling(s, np.full((s, 6), -1, np.int32), [0] * s,
                             temperature=[0.8, 0, 0, 0], top_p=[0.9, 1, 1, 1],
                             repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.5)
    ids, lp, top_ids, top_lp = run(logits, sampling, apply_penalties=True, num_top_logprobs=3)
    assert np.isfinite(lp).all() and np.isfinite(top_lp).all()
    assert ((ids >= 0) & (ids < v)).all()
    np.testing.assert_array_equal(ids[1:3], logits[1:3].argmax(-1))


def test_banned_tokens_are_never_sampled():
    """min_tokens: EOS/stop ids of a row are banned; other rows and padding entries are unaffected."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 16)).astype(np.float32)
    logits[:, 5] = 50.0  # token 5 dominates every row
    st = make_sampling(3, temperature=[0.0, 1.0, 0.0], seeds=[1, 2, 3])
    banned = st.banned_token_ids.copy()
    banned[0, :2] = [5, 9]
    banned[1, 0] = 5
    st = st._replace(banned_token_ids=banned)
    expected_row0 = int(np.argmax(np.where(np.isin(np.arange(16), [5, 9]), -np.inf, logits[0])))
    for step in range(20):
        ids = run(logits, st._replace(steps=np.full(3, step, np.int32)))[0]
        assert ids[0] == expected_row0
        assert ids[1] != 5
        assert ids[2] == 5  # row 2 bans nothing (its -1 padding must not wrap to token 15)


def test_without_logprobs_the_same_tokens_and_greedy_is_argmax():
    """The variant for batches that ask for no logprobs skips them and samples the same tokens."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 40)).astype(np.float32)
    temperature = np.array([0, 0.8, 0, 1.3, 0.5, 0], np.float32)
    sampling = make_sampling(6, temperature=temperature, seeds=np.arange(6) + 11, top_k=5,
                             top_p=0.9)
    ids, logprobs, top_ids, top_logprobs = run(logits, sampling, num_top_logprobs=None)
    greedy = temperature < 1e-5
    np.testing.assert_array_equal(ids[greedy], logits[greedy].argmax(-1))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert all(ids[i] in top5[i] for i in range(6))  # top_k still applies
    with_logprobs, *_ = run(logits, sampling, num_top_logprobs=3)
    np.testing.assert_array_equal(ids, with_logprobs)
    assert top_ids.shape == (6, 0) and top_logprobs.shape == (6, 0) and not logprobs.any()


def test_draw_kinds_picked_on_the_host_sample_what_the_general_program_samples():
    """"greedy" and "random" skip work the batch does not need; on the batches `draw_kind` gives
    them they must sample exactly what the general "filtered" program samples (and greedy rows
    stay the argmax)."""
    from jaxpaged.sampling_params import SamplingParams, draw_kind

    assert draw_kind([SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=3)]) == "greedy"
    assert draw_kind([SamplingParams(temperature=0), SamplingParams(temperature=0.7)]) == "random"
    assert draw_kind([SamplingParams(temperature=0.7), SamplingParams(temperature=1, min_p=0.1)]) == "filtered"
    assert draw_kind([SamplingParams(temperature=0, top_p=0.5)]) == "greedy"  # greedy ignores filters

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 50)).astype(np.float32)
    cases = {"greedy": make_sampling(6, temperature=0.0, top_k=4),
             "random": make_sampling(6, temperature=np.array([0, 0.8, 1.2, 0, 0.5, 2.0]),
                                     seeds=np.arange(6) + 3)}
    for kind, sampling in cases.items():
        ids, *_ = [np.asarray(x) for x in sample_jit(jnp.asarray(logits), sampling,
                                                      apply_penalties=False, num_top_logprobs=None,
                                                      draw=kind)]
        general, *_ = run(logits, sampling, num_top_logprobs=None)
        np.testing.assert_array_equal(ids, general, err_msg=kind)
        greedy = sampling.temperature < 1e-5
        np.testing.assert_array_equal(ids[greedy], logits[greedy].argmax(-1))
    assert len(set(ids[~greedy].tolist())) > 1  # the random rows really drew
