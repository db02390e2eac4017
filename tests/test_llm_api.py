"""The offline API's behaviour with the real SmolLM2: stops, n, logprobs, errors, detokenization."""

import numpy as np
import pytest
import torch

from jaxpaged import SamplingParams
from jaxpaged.detokenizer import IncrementalDetokenizer

PROMPT = "Write a short story about a robot who learns to paint."


def greedy(llm, prompt=PROMPT, **kwargs):
    params = SamplingParams(temperature=0, **{"max_tokens": 40, **kwargs})
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def assert_no_pages_in_use(llm):
    engine = llm.engine
    assert not engine.has_unfinished
    assert engine.pages.num_free_pages == engine.pages.num_pages


def test_stop_string_is_cut_and_not_emitted(smollm2_llm):
    full = greedy(smollm2_llm, ignore_eos=True)
    stop = full.text[12:16]
    assert stop and stop in full.text
    cut = greedy(smollm2_llm, stop=["zzzz-never", stop], ignore_eos=True)
    assert cut.text == full.text[:full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    kept = greedy(smollm2_llm, stop=stop, include_stop_str_in_output=True, ignore_eos=True)
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(smollm2_llm):
    full = greedy(smollm2_llm, ignore_eos=True)
    token = full.token_ids[6]
    first = full.token_ids.index(token)
    out = greedy(smollm2_llm, stop_token_ids=[token], ignore_eos=True)
    assert out.token_ids == full.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", token)
    short = greedy(smollm2_llm, max_tokens=5, ignore_eos=True)
    assert short.token_ids == full.token_ids[:5] and short.finish_reason == "length"


def test_eos_min_tokens_and_ignore_eos(smollm2_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = dict(temperature=0, max_tokens=40)
    natural = smollm2_llm.chat(messages, SamplingParams(**params), use_tqdm=False)[0].outputs[0]
    eos = smollm2_llm.engine.eos_token_ids
    assert natural.finish_reason == "stop" and natural.token_ids[-1] in eos
    n = len(natural.token_ids)
    held = smollm2_llm.chat(messages, SamplingParams(min_tokens=n + 3, **params),
                            use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) >= n + 3
    assert not set(held.token_ids[:n + 3]) & eos  # EOS was banned, not just ignored
    ignored = smollm2_llm.chat(messages, SamplingParams(ignore_eos=True, **params),
                               use_tqdm=False)[0].outputs[0]
    assert len(ignored.token_ids) == 40 and ignored.finish_reason == "length"


def test_n_sequences(smollm2_llm):
    out = smollm2_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16),
                               use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = smollm2_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16),
                                 use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert_no_pages_in_use(smollm2_llm)


def test_logprobs_match_transformers(smollm2_llm, hf_smollm2):
    model, tokenizer = hf_smollm2
    out = smollm2_llm.generate(PROMPT, SamplingParams(temperature=0.8, seed=3, max_tokens=12,
                                                      logprobs=4), use_tqdm=False)[0]
    completion = out.outputs[0]
    ids = torch.tensor([out.prompt_token_ids + completion.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(out.prompt_token_ids) - 1:-1].double()
    expected = torch.log_softmax(logits, dim=-1).numpy()
    assert len(completion.logprobs) == len(completion.token_ids)
    total = 0.0
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert token in entry and len(entry) >= 4
        top4 = np.argsort(-expected[step])[:4]
        assert set(top4) <= set(entry)
        for tid, lp in entry.items():
            assert abs(lp - expected[step, tid]) < 1e-4
        total += expected[step, token]
    assert abs(completion.cumulative_logprob - total) < 1e-3


def test_token_id_prompts_and_input_order(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    prompts = ["A", "The quick brown fox jumps over the lazy dog. " * 6, "Hello"]
    by_text = smollm2_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert [o.prompt for o in by_text] == prompts
    ids = [tokenizer(p).input_ids for p in prompts]
    by_ids = smollm2_llm.generate(ids, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]


def test_incremental_detokenization_never_splits_characters(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    text = "Prices: 5€ — naïve café, 日本語のテキスト, emoji 🎉🚀 done."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    for token in ids:
        detok.add_token(token)
        assert "\ufffd" not in detok.text
        assert text.startswith(detok.text)
    assert detok.text == tokenizer.decode(ids) == text


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n must"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(logprobs=21), "logprobs"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(stop=[""]), "stop"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=3), "presence_penalty"),
])
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_invalid_requests_lose_nothing(smollm2_llm):
    too_long = list(range(100, 600))
    with pytest.raises(ValueError, match="maximum context length is 512 tokens"):
        smollm2_llm.generate(["fine", too_long], SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams for"):
        smollm2_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        smollm2_llm.generate([], use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be in"):
        smollm2_llm.generate([[1, 2, 10**9]], use_tqdm=False)
    with pytest.raises(ValueError, match="role"):
        smollm2_llm.chat([{"role": "wizard", "content": "hi"}], use_tqdm=False)
    assert_no_pages_in_use(smollm2_llm)  # the valid prompt of the failed batch was not left behind
    assert greedy(smollm2_llm, max_tokens=3, ignore_eos=True).finish_reason == "length"  # still serves


def test_unknown_llm_argument():
    from jaxpaged import LLM

    with pytest.raises(ValueError, match="unknown LLM argument"):
        LLM(max_num_seq=4)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(max_num_seqs=64, max_num_batched_tokens=32)


def test_page_size_default_by_platform():
    from jaxpaged.config import EngineConfig

    assert EngineConfig().resolved_page_size("gpu") == 64
    assert EngineConfig().resolved_page_size("cpu") == EngineConfig().resolved_page_size("tpu") == 16
    assert EngineConfig(page_size=32).resolved_page_size("gpu") == 32
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        EngineConfig(page_size=48)


def test_default_token_buckets():
    from jaxpaged.config import EngineConfig

    # powers of two from 8 rows (batch-1 decoding's bucket), the token budget always the last
    assert EngineConfig(max_num_batched_tokens=100).resolved_token_buckets() == (8, 16, 32, 64, 100)
    assert EngineConfig(max_num_seqs=4, max_num_batched_tokens=4).resolved_token_buckets() == (4,)
    assert EngineConfig(token_buckets=(4, 512)).resolved_token_buckets() == (4, 512)
    with pytest.raises(ValueError, match="largest token bucket"):
        EngineConfig(token_buckets=(8, 64))


def test_engine_uses_the_resolved_page_size(smollm2_llm):
    engine = smollm2_llm.engine
    assert engine.page_size == engine.pages.page_size == 16  # CPU
    assert engine.runner.kv_pages[0].shape[1] == 16


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_abort_frees_pages(smollm2_llm, async_scheduling):
    engine = smollm2_llm.engine
    before, engine.async_scheduling = engine.async_scheduling, async_scheduling
    try:
        engine.add_request("to-abort", list(range(100, 180)), SamplingParams(max_tokens=50))
        engine.add_request("to-keep", list(range(200, 230)),
                           SamplingParams(max_tokens=3, temperature=0))
        outputs = []
        for _ in range(3):
            outputs += engine.step()
        assert engine.pages.num_free_pages < engine.pages.num_pages
        engine.abort("to-abort")  # under async scheduling, while its next step is on the device
        while engine.has_unfinished:
            outputs += engine.step()
    finally:
        engine.async_scheduling = before
    assert engine.pages.num_free_pages == engine.pages.num_pages
    assert {o.request_id for o in outputs if o.finished} == {"to-keep"}
    kept = [o for o in outputs if o.request_id == "to-keep"][-1].outputs[0]
    assert len(kept.token_ids) == 3 and kept.finish_reason == "length"
