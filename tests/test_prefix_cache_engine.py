"""Prefix caching with the real model: outputs identical with caching on and off (greedy)."""

import pytest

from jaxpaged import LLM, SamplingParams

SYSTEM = ("You are a careful assistant for a library. You answer questions about books, authors and "
          "opening hours. Keep answers short, friendly and factual. ")

REQUESTS = [
    SYSTEM + "Question: Who wrote Hamlet?",
    SYSTEM + "Question: When does the library open on Sunday?",
    SYSTEM,  # a strict prefix of every other request
    SYSTEM[:70],  # a shared prefix ending mid-page
    SYSTEM[:70] + " and poems about the sea",
    SYSTEM + "Question: Recommend a novel about whales, and explain why in two sentences.",
    "Completely unrelated prompt with no shared prefix at all.",
]


def make_llm(enable_prefix_caching: bool) -> LLM:
    return LLM(dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
               num_pages=40, token_buckets=(16, 64), enable_prefix_caching=enable_prefix_caching)


@pytest.fixture(scope="module")
def engines():
    return make_llm(True), make_llm(False)


def test_outputs_identical_with_prefix_caching_on_and_off(engines):
    cached, uncached = engines
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in uncached.generate(REQUESTS, params, use_tqdm=False)]
    first = [o.outputs[0].token_ids for o in cached.generate(REQUESTS, params, use_tqdm=False)]
    scheduler = cached.engine.scheduler
    hits_after_first = scheduler.prefix_cache_hits
    second = [o.outputs[0].token_ids for o in cached.generate(REQUESTS[::-1], params, use_tqdm=False)]
    assert first == expected
    assert second[::-1] == expected
    assert scheduler.prefix_cache_hits > hits_after_first > 0
    assert uncached.engine.scheduler.prefix_cache_hits == 0
    pages = cached.engine.pages
    assert all(count == 0 for count in pages.refcounts) and pages.num_free_pages == pages.num_pages


def test_salted_requests_do_not_hit_each_other(engines):
    cached, _ = engines
    engine, params = cached.engine, SamplingParams(temperature=0, max_tokens=4)
    prompt = cached.get_tokenizer()(SYSTEM + "Salted question?").input_ids
    results = {}
    for rid, salt in [("a", "tenant-a"), ("b", "tenant-b"), ("c", "tenant-a")]:
        engine.add_request(rid, prompt, params, cache_salt=salt)
        while engine.has_unfinished:
            for output in engine.step():
                results[output.request_id] = output
        results[rid + "-cached"] = engine.scheduler.prefix_cache_hits
    assert results["b-cached"] == results["a-cached"]  # tenant b found nothing of tenant a
    assert results["c-cached"] > results["b-cached"]  # tenant a found its own pages
    assert results["a"].outputs[0].token_ids == results["b"].outputs[0].token_ids == results["c"].outputs[0].token_ids


def test_llm_accepts_salted_dict_prompts(engines):
    cached, _ = engines
    scheduler, params = cached.engine.scheduler, SamplingParams(temperature=0, max_tokens=2)
    prompt = SYSTEM + "A question only tenant x asks?"
    cached.generate([{"prompt": prompt, "cache_salt": "x"}], params, use_tqdm=False)
    before = scheduler.prefix_cache_hits
    cached.generate([{"prompt": prompt, "cache_salt": "y"}], params, use_tqdm=False)
    assert scheduler.prefix_cache_hits == before
    ids = cached.get_tokenizer()(prompt).input_ids
    cached.generate([{"prompt_token_ids": ids, "cache_salt": "x"}], params, use_tqdm=False)
    assert scheduler.prefix_cache_hits > before
    with pytest.raises(ValueError, match="dict prompt"):
        cached.generate([{"prompt": prompt, "prompt_token_ids": ids}], params, use_tqdm=False)
