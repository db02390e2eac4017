"""Async scheduling on the host: step N+1 is scheduled and dispatched before step N's ids arrive.

A fake device stands in for the model. Its "KV cache" holds the token ids themselves, written
into the pages the step inputs name, and the token it samples for a sequence is a fixed function
of the tokens it reads back from those pages. Tokens the host has not seen yet come from the
previous step's output through `token_src`, as on the real device. The oracle is that function
iterated directly on each prompt, with no scheduler, pages or lag involved: every finished request
must produce exactly its tokens (EOS and stop tokens included, so some steps are wasted on
requests that already stopped), with heavy prefix sharing, preemption and aborts in between.
"""

import numpy as np
import pytest

from jaxpaged.pages import PageManager
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler
from jaxpaged.step_inputs import build_step_inputs

VOCAB, EOS, STOP = 23, 0, 1
PAGE_SIZE, NUM_PAGES, MAX_NUM_SEQS, BUDGET, MAX_MODEL_LEN = 4, 24, 6, 24, 64
PAGES_PER_SEQ = MAX_MODEL_LEN // PAGE_SIZE


def next_token(tokens: list[int]) -> int:
    """The fake model: any deterministic function of the whole sequence."""
    return (sum((i % 7 + 1) * t for i, t in enumerate(tokens)) * 5 + len(tokens)) % VOCAB


def expected_outputs(request: Request) -> list[int]:
    params, tokens, out = request.params, list(request.prompt_token_ids), []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        out.append(token)
        if len(out) >= params.min_tokens and (
                (token == EOS and not params.ignore_eos) or token in params.stop_token_ids):
            return out
        if len(out) >= request.max_tokens or len(tokens) >= MAX_MODEL_LEN:
            return out


class FakeDevice:
    def __init__(self):
        self.kv = np.full((NUM_PAGES, PAGE_SIZE), -1, np.int64)  # token id held at each slot
        self.last = np.zeros(MAX_NUM_SEQS, np.int64)  # the previous step's sampled ids

    def run(self, inputs) -> np.ndarray:
        attn = inputs.attention
        token_ids = np.where(inputs.token_src >= 0, self.last[np.maximum(inputs.token_src, 0)],
                             inputs.token_ids)
        sampled = np.zeros(MAX_NUM_SEQS, np.int64)
        num_seqs = int(attn.num_seqs[0])
        # Every new token is written before any sequence reads, as the reference and GPU ops do
        # (so sequences admitted in one step may share pages one of them computes).
        for i in range(num_seqs):
            for t in range(attn.cu_q_lens[i], attn.cu_q_lens[i + 1]):
                page = attn.page_indices[i, attn.positions[t] // PAGE_SIZE]
                self.kv[page, attn.positions[t] % PAGE_SIZE] = token_ids[t]
        for i in range(num_seqs):
            kv_len = attn.kv_lens[i]
            pages = attn.page_indices[i, :-(-kv_len // PAGE_SIZE)]
            seen = self.kv[pages].reshape(-1)[:kv_len]
            assert (seen >= 0).all(), "read a slot nothing wrote"
            sampled[i] = next_token(seen.tolist())
        self.last = sampled
        return sampled


def make_request(rng, rid: int, prefixes: list[list[int]]) -> Request:
    prefix = prefixes[rng.integers(len(prefixes))]
    prompt = prefix[:rng.integers(1, len(prefix) + 1)] + rng.integers(2, VOCAB, rng.integers(0, 9)).tolist()
    max_tokens = int(rng.integers(1, 20))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=bool(rng.random() < 0.2),
                            min_tokens=int(rng.integers(0, max_tokens + 1)) if rng.random() < 0.2 else 0,
                            stop_token_ids=[STOP] if rng.random() < 0.5 else None)
    return Request(request_id=f"r{rid}", prompt_token_ids=prompt, params=params, seed=0,
                   eos_token_ids=frozenset([EOS]), max_tokens=max_tokens,
                   cache_salt="other" if rng.random() < 0.1 else None)


def schedule_and_dispatch(sched: Scheduler, device: FakeDevice):
    batch = sched.schedule()
    if not batch:
        return None
    inputs = build_step_inputs(batch.requests, batch.num_new_tokens, token_bucket=BUDGET,
                               max_num_seqs=MAX_NUM_SEQS, pages_per_seq=PAGES_PER_SEQ,
                               history_width=1)
    for request, n, start in zip(batch.requests, batch.num_new_tokens,
                                 inputs.attention.cu_q_lens):
        pending = request.num_computed_tokens + n > request.num_tokens
        assert pending == (inputs.token_src[start + n - 1] >= 0)
        assert inputs.token_src[start:start + n - 1].tolist() == [-1] * (n - 1)
    sampled = device.run(inputs)
    sched.commit(batch)
    return batch, sampled


@pytest.mark.parametrize("share_within_step", [False, True])
@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("seed", range(4))
def test_outputs_equal_the_oracle_with_and_without_lag(seed, lag, share_within_step):
    rng = np.random.default_rng(seed)
    sched = Scheduler(PageManager(NUM_PAGES, PAGE_SIZE, enable_prefix_caching=True),
                      max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=BUDGET,
                      max_model_len=MAX_MODEL_LEN, share_pages_within_step=share_within_step)
    device = FakeDevice()
    prefixes = [rng.integers(2, VOCAB, 24).tolist() for _ in range(3)]
    requests, aborted, in_flight = [], set(), []
    for step in range(3000):
        if step < 400 and rng.random() < 0.5:
            request = make_request(rng, len(requests), prefixes)
            sched.add(request)
            requests.append(request)
        live = list(sched.waiting) + sched.running
        if live and rng.random() < 0.03:
            victim = live[rng.integers(len(live))]
            sched.finish(victim, "abort")
            aborted.add(victim.request_id)
        dispatched = schedule_and_dispatch(sched, device)
        if dispatched:
            in_flight.append(dispatched)
        while len(in_flight) > lag or (in_flight and not dispatched):
            sched.update(*in_flight.pop(0))
        if step > 400 and not sched.has_unfinished and not in_flight:
            break
    assert not sched.has_unfinished and not in_flight
    assert sched.num_preemptions > 0 and sched.prefix_cache_hits > 0
    for request in requests:
        expected = expected_outputs(request)
        if request.request_id in aborted:
            assert request.output_token_ids == expected[:len(request.output_token_ids)]
        else:
            assert request.output_token_ids == expected, request.request_id
            assert request.finish_reason in ("stop", "length")
        assert request.page_ids == [] and request.num_pending == 0
    pages = sched.pages
    assert pages.num_free_pages == NUM_PAGES and pages.refcounts == [0] * NUM_PAGES


def test_a_request_that_stops_while_its_next_step_runs_drops_that_step():
    sched = Scheduler(PageManager(8, PAGE_SIZE), max_num_seqs=2, max_num_batched_tokens=16,
                      max_model_len=32)
    device = FakeDevice()
    prompt = [5, 6, 7]
    # EOS as the first token the fake model samples is not guaranteed; find a prompt where it is.
    while next_token(prompt) != EOS:
        prompt = [(t + 1) % VOCAB or 2 for t in prompt]
    request = Request("a", prompt, SamplingParams(max_tokens=8), seed=0,
                      eos_token_ids=frozenset([EOS]), max_tokens=8)
    sched.add(request)
    first = schedule_and_dispatch(sched, device)  # prefill: samples EOS, unknown to the host yet
    assert request.num_pending == 1
    second = schedule_and_dispatch(sched, device)  # already decoding the token it doesn't know
    assert second[0].requests == [request] and request.num_pending == 2
    assert sched.update(*first) == [request] and request.finish_reason == "stop"
    assert request.output_token_ids == [EOS] and request.page_ids == []
    assert sched.update(*second) == []  # the wasted step changes nothing
    assert request.output_token_ids == [EOS] and sched.pages.num_free_pages == 8


def test_no_step_is_scheduled_past_max_tokens():
    sched = Scheduler(PageManager(8, PAGE_SIZE), max_num_seqs=2, max_num_batched_tokens=16,
                      max_model_len=32)
    device = FakeDevice()
    request = Request("a", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True), seed=0,
                      eos_token_ids=frozenset([EOS]), max_tokens=2)
    sched.add(request)
    steps = [schedule_and_dispatch(sched, device), schedule_and_dispatch(sched, device)]
    assert request.num_pending == 2
    assert sched.schedule().requests == []  # both tokens are on the device: nothing left to do
    for step in steps:
        sched.update(*step)
    assert request.finish_reason == "length" and len(request.output_token_ids) == 2


@pytest.mark.parametrize("share_within_step", [False, True])
def test_requests_admitted_together_share_a_prefix_only_within_step_sharing(share_within_step):
    sched = Scheduler(PageManager(16, PAGE_SIZE, enable_prefix_caching=True), max_num_seqs=4,
                      max_num_batched_tokens=64, max_model_len=32,
                      share_pages_within_step=share_within_step)
    prefix = list(range(2, 2 + 3 * PAGE_SIZE))  # three full pages
    first, second = (Request(name, prefix + [20 + i], SamplingParams(max_tokens=2), seed=0,
                             eos_token_ids=frozenset([EOS]), max_tokens=2)
                     for i, name in enumerate("ab"))
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()
    scheduled = {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens)}
    if share_within_step:  # the second reads the three pages the first writes in this step
        assert second.num_computed_tokens == 3 * PAGE_SIZE
        assert second.page_ids[:3] == first.page_ids[:3] and scheduled == {"a": 13, "b": 1}
        assert batch.requests == [second, first]  # now a decode: first in the batch
        # A step that never runs: the shared pages must not stay in the cache.
        sched.drop_uncommitted()
        assert sched.pages.lookup(sched._hashes(first)[:3]) == []
    else:
        assert second.num_computed_tokens == 0 and scheduled == {"a": 13, "b": 13}
        assert not set(second.page_ids) & set(first.page_ids)
