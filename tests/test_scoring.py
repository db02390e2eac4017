"""Prompt logprobs and `LLM.score` on SmolLM2-135M, against transformers' logits (the oracle)."""

import math

import numpy as np
import pytest
import torch

from jaxpaged import SamplingParams
from jaxpaged.prompts import encode_pair

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "Explain why the sky is blue in one paragraph, using simple words a child would understand, "
    "and mention Rayleigh scattering by name. " * 3,
    "1, 2, 3, 4,",
    "Once upon a time, in a land far away, there lived a dragon who loved to read books about "
    "knights, castles and the strange habits of people who lived in the valley below. " * 2,
]

QUESTIONS = [
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Berlin"]),
    ("Question: How many legs does a spider have?\nAnswer:", [" eight", " six", " four"]),
    ("Question: What colour is the sky on a clear day?\nAnswer:", [" blue", " green", " red"]),
    ("The opposite of hot is", [" cold", " warm", " loud"]),
]


def hf_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log_softmax of transformers' logits [len(tokens), V]: row p predicts token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_prompt_logprobs_match_transformers(smollm2_llm, hf_smollm2):
    model, tokenizer = hf_smollm2
    engine = smollm2_llm.engine
    k = 5
    lengths = [len(tokenizer(p).input_ids) for p in PROMPTS]
    assert max(lengths) > engine.config.max_num_batched_tokens  # chunked prefill happens
    preemptions_before = engine.scheduler.num_preemptions
    outputs = smollm2_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4,
                                                           prompt_logprobs=k), use_tqdm=False)
    for output in outputs:
        tokens = output.prompt_token_ids
        prompt_logprobs = output.prompt_logprobs
        assert len(prompt_logprobs) == len(tokens) and prompt_logprobs[0] is None
        expected = hf_logprobs(model, tokens)
        for p in range(1, len(tokens)):
            entry, row = prompt_logprobs[p], expected[p - 1]
            top = set(np.argsort(-row)[:k].tolist())
            assert set(entry) == top | {tokens[p]}, p
            for token, logprob in entry.items():
                assert logprob == pytest.approx(float(row[token]), abs=1e-4), (p, token)
    # The small page pool preempted, and recomputed positions were not recorded twice.
    assert engine.scheduler.num_preemptions > preemptions_before
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_prompt_logprobs_off_by_default(smollm2_llm):
    [output] = smollm2_llm.generate("Hello", SamplingParams(max_tokens=1), use_tqdm=False)
    assert output.prompt_logprobs is None


def test_prompt_logprobs_zero_holds_only_the_actual_token(smollm2_llm):
    [output] = smollm2_llm.generate("One two three four", SamplingParams(
        temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    tokens = output.prompt_token_ids
    assert [list(e) for e in output.prompt_logprobs[1:]] == [[t] for t in tokens[1:]]


def test_prompt_logprobs_over_several_slices(smollm2_llm):
    """More rows than one prompt-logprob program takes: the slices' results, cut and joined,
    equal numpy's log-softmax of the same hidden rows times the LM head."""
    from jaxpaged.models.llama import lm_head_of
    from jaxpaged.runner import MAX_LOGPROBS

    runner = smollm2_llm.engine.runner
    smollm2_llm.generate("Count with me: one, two, three, four, five, six", SamplingParams(
        temperature=0, max_tokens=1), use_tqdm=False)  # leaves the step's hidden rows behind
    hidden = np.asarray(runner._hidden, np.float64)  # [T, D]
    n = 2 * runner.prompt_logprob_rows + 5
    rng = np.random.default_rng(0)
    rows = rng.integers(0, hidden.shape[0], n).astype(np.int32)
    targets = rng.integers(0, smollm2_llm.engine.model_config.vocab_size, n).astype(np.int32)
    target_lps, top_ids, top_lps = runner.prompt_logprobs(rows, targets)
    assert target_lps.shape == (n,) and top_ids.shape == top_lps.shape == (n, MAX_LOGPROBS)
    logits = hidden[rows] @ np.asarray(lm_head_of(runner.params), np.float64)  # [n, V]
    want = logits - logits.max(-1, keepdims=True)
    want -= np.log(np.exp(want).sum(-1, keepdims=True))
    np.testing.assert_allclose(target_lps, want[np.arange(n), targets], atol=1e-4)
    np.testing.assert_allclose(top_lps, -np.sort(-want, axis=-1)[:, :MAX_LOGPROBS], atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(want, top_ids, axis=-1), top_lps, atol=1e-4)


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_prompt_logprobs_validated(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_score_matches_transformers(smollm2_llm, hf_smollm2):
    model, tokenizer = hf_smollm2
    contexts = [q for q, answers in QUESTIONS for _ in answers]
    continuations = [a for _, answers in QUESTIONS for a in answers]
    scores = smollm2_llm.score(contexts, continuations, use_tqdm=False)
    assert len(scores) == len(contexts)
    num_greedy = 0
    for context, continuation, score in zip(contexts, continuations, scores):
        # lm-eval's split, written out: encode the whole, the continuation is what follows the
        # context's own tokens.
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        num_context = len(tokenizer.encode(context, add_special_tokens=False))
        expected = hf_logprobs(model, whole)
        target = whole[num_context:]
        rows = expected[num_context - 1:len(whole) - 1]
        assert score.token_ids == target
        want = float(sum(rows[i, t] for i, t in enumerate(target)))
        assert score.logprob == pytest.approx(want, abs=1e-4 * len(target))
        assert score.is_greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(target))
        num_greedy += score.is_greedy
    assert 0 < num_greedy < len(scores)  # both branches of the greedy check were exercised
    paris, london, _ = scores[:3]
    assert paris.logprob > london.logprob


def test_encode_pair_moves_trailing_space_and_splits_like_lm_eval(hf_smollm2):
    _, tokenizer = hf_smollm2
    whole, n = encode_pair(tokenizer, "The answer is ", "42")
    assert whole == tokenizer.encode("The answer is 42", add_special_tokens=False)
    assert n == len(tokenizer.encode("The answer is", add_special_tokens=False))
    whole, n = encode_pair(tokenizer, "", "Hello")
    assert n == 1 and len(whole) > 1
    with pytest.raises(ValueError, match="continuation"):
        encode_pair(tokenizer, "context", "")


def test_score_rejects_mismatched_lists(smollm2_llm):
    with pytest.raises(ValueError, match="contexts"):
        smollm2_llm.score(["a", "b"], ["c"])
    assert smollm2_llm.score([], []) == []
    assert not math.isnan(smollm2_llm.score(["Hi"], [" there"], use_tqdm=False)[0].logprob)
