"""Scheduler: budgets, chunked prefill, preemption, aborts and stop checks. Host only, no JAX.

The randomized test drives the scheduler with fake sampled tokens and checks the page, queue and
step-input invariants after every operation against a shadow copy of each request's tokens.
"""

import itertools

import numpy as np
import pytest

from jaxpaged.pages import PageManager
from jaxpaged.request import Request, Status
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler
from jaxpaged.step_inputs import build_step_inputs

EOS = 0
_ids = itertools.count()


def make_request(prompt_len: int, max_tokens: int = 8, *, eos=(EOS,), **params) -> Request:
    prompt = [100 + (i % 50) for i in range(prompt_len)]  # never EOS or a stop token
    return Request(request_id=f"r{next(_ids)}", prompt_token_ids=prompt,
                   params=SamplingParams(max_tokens=max_tokens, **params), seed=7,
                   eos_token_ids=frozenset(eos), max_tokens=max_tokens)


def make_scheduler(*, num_pages=64, page_size=4, max_num_seqs=8, budget=32, max_model_len=128):
    return Scheduler(PageManager(num_pages, page_size), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_model_len=max_model_len)


def step(sched: Scheduler, token: int = 5):
    """One engine step with every sequence sampling `token`; returns (batch, advanced)."""
    batch = sched.schedule()
    return batch, sched.update(batch, [token] * len(batch))


def pages_for(sched: Scheduler, num_tokens: int) -> int:
    return -(-num_tokens // sched.pages.page_size)


def is_decode(request: Request, n: int) -> bool:
    return n == 1 and request.num_computed_tokens == request.num_tokens - 1


# ---- budgets and ordering --------------------------------------------------------------------


def test_token_budget_is_filled_and_never_exceeded():
    sched = make_scheduler(budget=16, max_num_seqs=4)
    for prompt_len in (10, 9, 7, 30):
        sched.add(make_request(prompt_len, max_tokens=4))
    totals = []
    while sched.has_unfinished:
        batch, _ = step(sched)
        assert 0 < batch.total_tokens <= 16
        assert all(n >= 1 for n in batch.num_new_tokens)
        totals.append(batch.total_tokens)
        assert len(totals) < 100
    # 56 prompt tokens: the first three steps are full chunks of the budget.
    assert totals[:3] == [16, 16, 16]
    assert sum(totals) == 56 + 4 * 4 - 4  # the last sampled token of each request is never fed back


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_num_seqs=3, budget=64)
    requests = [make_request(3, max_tokens=2) for _ in range(7)]
    for request in requests:
        sched.add(request)
    batch, _ = step(sched)
    assert batch.requests == requests[:3]
    assert len(sched.running) == 3 and list(sched.waiting) == requests[3:]
    batch, _ = step(sched)  # the first three decode their last token and finish
    assert batch.requests == requests[:3] and batch.num_new_tokens == [1, 1, 1]
    assert all(r.finish_reason == "length" for r in requests[:3])
    batch, _ = step(sched)
    assert batch.requests == requests[3:6]
    while sched.has_unfinished:
        batch, _ = step(sched)
        assert len(batch) <= 3 and len(sched.running) <= 3


def test_decodes_come_before_prefill_chunks():
    sched = make_scheduler(budget=8)
    long = make_request(12)
    sched.add(long)
    batch, _ = step(sched)
    assert batch.num_new_tokens == [8]
    single = make_request(1)  # a one-token prompt is scheduled exactly like a decode
    sched.add(single)
    batch = sched.schedule()
    assert batch.requests == [single, long]
    assert batch.num_new_tokens == [1, 4]
    sched.update(batch, [5, 5])
    older, newer = make_request(2), make_request(1)
    sched.add(older)
    sched.add(newer)
    batch = sched.schedule()
    flags = [is_decode(r, n) for r, n in zip(batch.requests, batch.num_new_tokens)]
    assert flags == sorted(flags, reverse=True)
    assert batch.requests[-1] is older


# ---- chunked prefill -------------------------------------------------------------------------


def test_long_prompt_is_chunked_and_samples_only_on_its_last_chunk():
    sched = make_scheduler(budget=8, page_size=4)
    request = make_request(20, max_tokens=3)
    sched.add(request)
    for computed in (0, 8):
        batch = sched.schedule()
        assert batch.requests == [request] and batch.num_new_tokens == [8]
        assert len(request.page_ids) == pages_for(sched, computed + 8)
        assert sched.update(batch, [999]) == []  # a partial chunk samples nothing
        assert request.output_token_ids == [] and request.num_computed_tokens == computed + 8
    batch = sched.schedule()
    assert batch.num_new_tokens == [4]
    assert sched.update(batch, [42]) == [request]
    assert request.output_token_ids == [42] and request.num_computed_tokens == 20
    batch = sched.schedule()
    assert batch.num_new_tokens == [1]  # now a decode
    assert sched.update(batch, [43]) == [request]
    assert request.output_token_ids == [42, 43]


# ---- preemption ------------------------------------------------------------------------------


def test_preemption_evicts_the_newest_request_and_it_resumes_by_recompute():
    sched = make_scheduler(num_pages=6, page_size=4, max_num_seqs=3, budget=64)
    a, b, c = (make_request(7, max_tokens=3) for _ in range(3))
    for request in (a, b, c):
        sched.add(request)
    step(sched, token=11)  # prefills: 2 pages each, the pool is now empty
    step(sched, token=12)  # decodes to 8 tokens: still 2 pages each
    assert sched.pages.num_free_pages == 0
    d = make_request(3)
    sched.add(d)  # waits: max_num_seqs
    c_pages = list(c.page_ids)

    batch = sched.schedule()  # a needs a third page: c, the newest, is preempted
    assert batch.num_preempted == 1 and sched.num_preemptions == 1
    assert batch.requests == [a, b]
    assert c.status is Status.WAITING and c.num_preemptions == 1
    assert list(sched.waiting) == [c, d]  # back at the front, ahead of d
    assert c.page_ids == [] and c.num_computed_tokens == 0
    assert c.output_token_ids == [11, 12]  # generated tokens are kept
    assert set(c_pages) == set(a.page_ids[2:] + b.page_ids[2:])  # its pages went to a and b
    sched.update(batch, [13, 13])
    assert a.finish_reason == b.finish_reason == "length"

    batch = sched.schedule()  # c recomputes prompt + generated tokens in one chunk
    assert batch.requests[0] is c and batch.num_new_tokens[0] == 9
    inputs = build_step_inputs(batch.requests, batch.num_new_tokens, token_bucket=16,
                               max_num_seqs=3, pages_per_seq=32, history_width=1)
    assert inputs.token_ids[:9].tolist() == c.prompt_token_ids + [11, 12]
    assert inputs.attention.positions[:9].tolist() == list(range(9))
    sched.update(batch, [14] * len(batch))
    assert c.output_token_ids == [11, 12, 14]
    assert c.finish_reason == "length"


def test_newest_request_preempts_itself_when_it_is_the_one_that_needs_a_page():
    sched = make_scheduler(num_pages=4, page_size=4, max_num_seqs=2, budget=64)
    a, b = make_request(5), make_request(7)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)  # a: 6 tokens, b: 8 tokens, two pages each
    batch, _ = step(sched)  # b needs a third page; no one newer to evict
    assert batch.requests == [a] and batch.num_preempted == 1
    assert list(sched.waiting) == [b] and b.page_ids == [] and b.num_computed_tokens == 0
    assert sched.pages.num_free_pages == 2 - (pages_for(sched, 7) - 2)


def test_no_new_requests_are_admitted_in_a_step_that_preempted():
    # A budget of 5 leaves room for a 4-token chunk of the victim right after it is evicted;
    # readmitting it in the same step would only thrash.
    sched = make_scheduler(num_pages=4, page_size=4, max_num_seqs=2, budget=5)
    a, b = make_request(4), make_request(8)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        step(sched)
    assert len(b.output_token_ids) == 1 and sched.pages.num_free_pages == 0
    batch, _ = step(sched)  # b needs a third page and evicts itself
    assert batch.requests == [a] and batch.num_preempted == 1
    assert list(sched.waiting) == [b] and sched.pages.num_free_pages == 2
    batch, _ = step(sched)  # next step it comes back with a chunk
    assert batch.requests == [a, b] and batch.num_new_tokens == [1, 4]


# ---- aborts ----------------------------------------------------------------------------------


def test_abort_waiting_request():
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = make_request(5), make_request(5)
    sched.add(running)
    sched.add(waiting)
    step(sched)
    sched.finish(waiting, "abort")
    assert waiting.finished and waiting.finish_reason == "abort" and waiting.page_ids == []
    assert list(sched.waiting) == [] and sched.running == [running]


def test_abort_running_request_mid_prefill_frees_its_pages():
    sched = make_scheduler(num_pages=8, budget=8)
    request = make_request(20)
    sched.add(request)
    step(sched)
    assert len(request.page_ids) == 2 and sched.pages.num_free_pages == 6
    sched.finish(request, "abort")
    assert request.status is Status.FINISHED and request.finish_reason == "abort"
    assert request.page_ids == [] and sched.pages.num_free_pages == 8
    assert not sched.has_unfinished


def test_abort_between_schedule_and_update_drops_the_result():
    sched = make_scheduler(num_pages=8)
    a, b = make_request(6), make_request(6)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.finish(a, "abort")
    assert sched.pages.num_free_pages == 8 - 2
    assert sched.update(batch, [5, 6]) == [b]
    assert a.output_token_ids == [] and a.page_ids == [] and a.finish_reason == "abort"
    assert b.output_token_ids == [6]
    sched.finish(a, "stop")  # finishing twice is a no-op
    assert a.finish_reason == "abort"


# ---- admission -------------------------------------------------------------------------------


def test_add_rejects_requests_longer_than_the_context():
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(ValueError, match="maximum context length is 16 tokens"):
        sched.add(make_request(10, max_tokens=7))
    sched.add(make_request(10, max_tokens=6))  # exactly the context length is fine
    assert len(sched.waiting) == 1


def test_add_rejects_an_empty_prompt():
    sched = make_scheduler()
    with pytest.raises(ValueError, match="at least one token"):
        sched.add(make_request(0))
    assert not sched.has_unfinished


def test_add_rejects_requests_larger_than_the_cache():
    sched = make_scheduler(num_pages=4, page_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="needs 5 KV-cache pages"):
        sched.add(make_request(10, max_tokens=7))
    sched.add(make_request(10, max_tokens=6))


# ---- stop checks -----------------------------------------------------------------------------


def run_tokens(request: Request, tokens: list[int]) -> Scheduler:
    sched = make_scheduler()
    sched.add(request)
    for token in tokens:
        assert not request.finished
        step(sched, token)
    return sched


def test_eos_stops():
    request = make_request(3)
    sched = run_tokens(request, [5, EOS])
    assert request.finish_reason == "stop" and request.stop_reason is None
    assert request.output_token_ids == [5, EOS]
    assert request.page_ids == [] and sched.pages.num_free_pages == sched.pages.num_pages


def test_ignore_eos_keeps_going():
    request = make_request(3, max_tokens=4, ignore_eos=True)
    run_tokens(request, [EOS, EOS, EOS, EOS])
    assert request.finish_reason == "length" and len(request.output_token_ids) == 4


def test_stop_token_ids_stop_even_with_ignore_eos():
    request = make_request(3, stop_token_ids=[9], ignore_eos=True)
    run_tokens(request, [5, 9])
    assert request.finish_reason == "stop" and request.stop_reason == 9


def test_other_tokens_do_not_stop():
    request = make_request(3, max_tokens=8, stop_token_ids=[9])
    sched = run_tokens(request, [5, 6, 7])
    assert not request.finished and request.status is Status.RUNNING
    assert sched.running == [request]


@pytest.mark.parametrize("stop", ["eos", "stop_token"])
def test_min_tokens_suppresses_stops(stop):
    token = EOS if stop == "eos" else 9
    request = make_request(3, max_tokens=8, min_tokens=3, stop_token_ids=[9])
    run_tokens(request, [token, token, token])
    assert request.finish_reason == "stop" and len(request.output_token_ids) == 3


def test_max_tokens_finishes_with_length():
    request = make_request(3, max_tokens=3)
    sched = run_tokens(request, [5, 6, 7])
    assert request.finish_reason == "length" and request.stop_reason is None
    assert request.output_token_ids == [5, 6, 7]
    assert sched.pages.num_free_pages == sched.pages.num_pages and not sched.has_unfinished


# ---- randomized property test ----------------------------------------------------------------

PAGE_SIZE = 4
NUM_PAGES = 24
MAX_NUM_SEQS = 4
BUDGET = 16
MAX_MODEL_LEN = 80
PAGES_PER_SEQ = MAX_MODEL_LEN // PAGE_SIZE
STOP_TOKEN = 1


class Harness:
    """Drives a scheduler like the engine does and checks every invariant after each operation."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.sched = make_scheduler(num_pages=NUM_PAGES, page_size=PAGE_SIZE, max_num_seqs=MAX_NUM_SEQS,
                                    budget=BUDGET, max_model_len=MAX_MODEL_LEN)
        self.requests: list[Request] = []
        self.outputs: dict[str, list[int]] = {}  # shadow copy of each request's generated tokens
        self.early: set[str] = set()  # finished by a (fake) stop string
        self.num_preempted = 0

    # ---- operations --------------------------------------------------------------------------

    def add(self):
        rng = self.rng
        prompt_len = int(rng.integers(1, 64)) if rng.random() < 0.3 else int(rng.integers(1, 12))
        max_tokens = int(rng.integers(1, 24))
        min_tokens = int(rng.integers(0, max_tokens + 1)) if rng.random() < 0.2 else 0
        request = make_request(prompt_len, max_tokens, ignore_eos=bool(rng.random() < 0.3),
                               min_tokens=min_tokens,
                               stop_token_ids=[STOP_TOKEN] if rng.random() < 0.5 else None)
        if prompt_len + max_tokens > MAX_MODEL_LEN:
            with pytest.raises(ValueError, match=f"maximum context length is {MAX_MODEL_LEN} tokens"):
                self.sched.add(request)
            return
        self.sched.add(request)
        self.requests.append(request)
        self.outputs[request.request_id] = []

    def abort(self):
        live = list(self.sched.waiting) + self.sched.running
        if live:
            self.sched.finish(live[self.rng.integers(len(live))], "abort")

    def step(self):
        sched, rng = self.sched, self.rng
        running_before = list(sched.running)
        batch = sched.schedule()
        self.num_preempted += batch.num_preempted
        victims = [r for r in running_before if r.status is Status.WAITING]
        assert len(victims) == batch.num_preempted
        if victims:
            # The newest are evicted, and wait ahead of everything else in their old order.
            assert [id(r) for r in running_before[-len(victims):]] == [id(r) for r in victims]
            assert [id(r) for r in list(sched.waiting)[:len(victims)]] == [id(r) for r in victims]
            assert all(r.page_ids == [] and r.num_computed_tokens == 0 for r in victims)
            # A step that preempts admits no new requests.
            assert {id(r) for r in batch.requests} <= {id(r) for r in running_before}
        self.check_batch(batch)
        before = [(r.num_computed_tokens, r.num_tokens) for r in batch.requests]
        if batch.requests and rng.random() < 0.05:  # an abort arrives while the step runs
            sched.finish(batch.requests[rng.integers(len(batch))], "abort")
        finished_before = [r.finished for r in batch.requests]
        tokens = rng.integers(0, 8, size=len(batch)).tolist()
        advanced = sched.update(batch, tokens)

        expected = [r for r, n, (computed, total), done in
                    zip(batch.requests, batch.num_new_tokens, before, finished_before)
                    if not done and computed + n == total]
        assert [id(r) for r in advanced] == [id(r) for r in expected]
        for request, token in zip(batch.requests, tokens):
            if any(r is request for r in advanced):
                self.outputs[request.request_id].append(token)
                self.check_stop(request, token)
        for request in advanced:  # a detokenizer found a stop string
            if not request.finished and rng.random() < 0.05:
                sched.finish(request, "stop", "<stop>")
                self.early.add(request.request_id)

    # ---- checks ------------------------------------------------------------------------------

    def check_stop(self, request: Request, token: int):
        params, num_output = request.params, len(request.output_token_ids)
        stops = num_output >= params.min_tokens and (
            (token == EOS and not params.ignore_eos) or token in params.stop_token_ids)
        if stops:
            assert request.finish_reason == "stop"
            assert request.stop_reason == (None if token == EOS and not params.ignore_eos else token)
        elif num_output >= request.max_tokens:
            assert request.finish_reason == "length"
        else:
            assert not request.finished

    def check_batch(self, batch):
        sched = self.sched
        assert len(batch) <= MAX_NUM_SEQS
        assert batch.total_tokens <= BUDGET
        assert len({id(r) for r in batch.requests}) == len(batch)
        running = {id(r) for r in sched.running}
        assert all(id(r) in running and r.status is Status.RUNNING for r in batch.requests)
        decode = [is_decode(r, n) for r, n in zip(batch.requests, batch.num_new_tokens)]
        assert decode == sorted(decode, reverse=True), "decodes must precede prefill chunks"
        scheduled = dict(zip(map(id, batch.requests), batch.num_new_tokens))
        for request in sched.running:
            n = scheduled.get(id(request), 0)
            assert request.num_computed_tokens + n <= request.num_tokens
            assert len(request.page_ids) == pages_for(sched, request.num_computed_tokens + n)
        self.check_pages()
        if batch:
            self.check_step_inputs(batch)

    def check_step_inputs(self, batch):
        total = batch.total_tokens
        bucket = max(4, 1 << (total - 1).bit_length())
        inputs = build_step_inputs(batch.requests, batch.num_new_tokens, token_bucket=bucket,
                                   max_num_seqs=MAX_NUM_SEQS, pages_per_seq=PAGES_PER_SEQ,
                                   history_width=MAX_MODEL_LEN)
        attn, sampling = inputs.attention, inputs.sampling
        num_seqs = len(batch)
        assert attn.num_seqs.tolist() == [num_seqs]
        cu = attn.cu_q_lens
        assert cu.shape == (MAX_NUM_SEQS + 1,) and cu[0] == 0
        assert np.diff(cu)[:num_seqs].tolist() == batch.num_new_tokens
        assert (cu[num_seqs:] == total).all()  # padding sequences have no queries
        assert (attn.kv_lens[num_seqs:] == 0).all()
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            expected = request.prompt_token_ids + self.outputs[request.request_id]
            rows = slice(cu[i], cu[i + 1])
            assert attn.positions[rows].tolist() == list(range(start, start + n))
            assert inputs.token_ids[rows].tolist() == expected[start:start + n]
            assert attn.kv_lens[i] == start + n
            assert attn.logits_indices[i] == cu[i + 1] - 1
            pages = attn.page_indices[i]
            assert pages[:len(request.page_ids)].tolist() == request.page_ids
            assert (pages[len(request.page_ids):] == 0).all()
            assert sampling.steps[i] == len(expected) - request.num_prompt_tokens
            history = sampling.token_history[i]
            assert history[:len(expected)].tolist() == expected and (history[len(expected):] == -1).all()
            assert sampling.num_prompt_tokens[i] == request.num_prompt_tokens
        assert (inputs.token_ids[total:] == 0).all() and (attn.positions[total:] == 0).all()

    def check_pages(self):
        sched, pages = self.sched, self.sched.pages
        free = list(pages.free_pages)
        assert len(free) == len(set(free))
        owner: dict[int, str] = {}
        for request in self.requests:
            for page in request.page_ids:
                assert page not in owner, f"page {page} owned by {owner[page]} and {request.request_id}"
                owner[page] = request.request_id
        assert not set(owner) & set(free)
        assert len(owner) + len(free) == pages.num_pages
        for page in range(pages.num_pages):
            assert pages.refcounts[page] == (1 if page in owner else 0)
        assert len(sched.running) <= MAX_NUM_SEQS

    def check_state(self):
        """Between operations: no step is in flight."""
        sched = self.sched
        running = {id(r) for r in sched.running}
        waiting = {id(r) for r in sched.waiting}
        assert len(running | waiting) == len(sched.running) + len(sched.waiting)
        for request in self.requests:
            assert request.output_token_ids == self.outputs[request.request_id]
            if id(request) in running:
                assert request.status is Status.RUNNING
                assert 0 < request.num_computed_tokens <= request.num_tokens
                assert len(request.page_ids) == pages_for(sched, request.num_computed_tokens)
            elif id(request) in waiting:
                assert request.status is Status.WAITING
                assert request.page_ids == [] and request.num_computed_tokens == 0
            else:
                assert request.status is Status.FINISHED and request.page_ids == []
                assert request.finish_reason in ("stop", "length", "abort")
            assert len(request.output_token_ids) <= request.max_tokens
        self.check_pages()


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_the_invariants(seed):
    rng = np.random.default_rng(seed)
    harness = Harness(rng)
    sched = harness.sched
    for _ in range(1000):
        op = rng.random()
        if op < 0.25:
            harness.add()
        elif op < 0.32:
            harness.abort()
        else:
            harness.step()
        harness.check_state()
    assert harness.num_preempted > 0 and sched.num_preemptions == harness.num_preempted
    assert any(r.num_preemptions for r in harness.requests)

    if seed % 2:  # drain by aborting everything still live
        for request in list(sched.waiting) + sched.running:
            sched.finish(request, "abort")
    else:  # drain by running to completion: preempted requests must come back and finish
        for _ in range(5000):
            if not sched.has_unfinished:
                break
            harness.step()
            harness.check_state()
        for request in harness.requests:
            if request.finish_reason == "length":
                assert len(request.output_token_ids) == request.max_tokens
            elif request.finish_reason == "stop" and request.request_id not in harness.early:
                assert request.output_token_ids[-1] in (EOS, STOP_TOKEN)
    assert not sched.has_unfinished
    harness.check_state()
    assert all(r.finished and r.page_ids == [] for r in harness.requests)
    assert sched.pages.num_free_pages == NUM_PAGES
    assert sorted(sched.pages.free_pages) == list(range(NUM_PAGES))
    assert sched.pages.refcounts == [0] * NUM_PAGES
