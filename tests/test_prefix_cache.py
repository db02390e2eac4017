"""Prefix caching on the host: hashing, sharing, LRU eviction, salts, and invariants under churn."""

import numpy as np
import pytest

from jaxpaged.pages import PageManager, page_hashes
from jaxpaged.request import Request, Status
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler

PAGE = 4


def make_request(rid, tokens, max_tokens=4, salt=None):
    return Request(request_id=str(rid), prompt_token_ids=list(tokens),
                   params=SamplingParams(max_tokens=max_tokens), seed=0,
                   eos_token_ids=frozenset(), max_tokens=max_tokens, cache_salt=salt)


def run_to_completion(scheduler, token=7):
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        scheduler.update(batch, [token] * len(batch))


def test_hash_chain_depends_on_prefix_and_salt():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], PAGE, None)
    b = page_hashes([9, 2, 3, 4, 5, 6, 7, 8], PAGE, None)
    assert len(a) == 2 and a[1] != b[1]  # same second page, different parent
    assert page_hashes([1, 2, 3, 4, 5, 6, 7, 8], PAGE, "tenant") != a
    assert page_hashes([1, 2, 3, 4, 5, 6, 7], PAGE, None) == a[:1]  # partial pages are not hashed
    assert page_hashes([1, 2, 3, 4, 5, 6, 7, 8], PAGE, None, start=1, parent=a[0]) == a[1:]


def test_lookup_register_share_and_release():
    pages = PageManager(6, PAGE, enable_prefix_caching=True)
    hashes = page_hashes(list(range(12)), PAGE, None)
    owned = pages.allocate(3)
    for page, h in zip(owned, hashes):
        pages.register(page, h)
    assert pages.lookup(hashes) == owned
    assert [pages.refcounts[p] for p in owned] == [2, 2, 2]
    pages.free(owned)
    pages.free(owned)
    assert pages.num_free_pages == 6 and len(pages.evictable) == 3  # cached, not forgotten
    assert pages.lookup(hashes[:2]) == owned[:2]
    assert pages.lookup([b"missing"] + hashes) == []


def test_eviction_is_lru_and_only_when_free_pages_run_out():
    pages = PageManager(4, PAGE, enable_prefix_caching=True)
    first, second = pages.allocate(2), pages.allocate(2)
    for page, h in zip(first + second, [b"a0", b"a1", b"b0", b"b1"]):
        pages.register(page, h)
    pages.free(first)  # released first: evicted first, tail page before head page
    pages.free(second)
    assert pages.allocate(1) == [first[1]]
    assert pages.lookup([b"a0"]) == [first[0]]  # still cached
    pages.free([first[0]])  # now the most recently released
    assert pages.allocate(2) == [second[1], second[0]]
    assert pages.lookup([b"b0"]) == []  # evicted entries are forgotten
    assert pages.lookup([b"a0"]) == [first[0]]


def test_scheduler_reuses_prefix_and_keeps_one_token_to_compute():
    pages = PageManager(32, PAGE, enable_prefix_caching=True)
    scheduler = Scheduler(pages, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    shared = list(range(100, 110))  # 2 full pages + 2 tokens
    first = make_request(0, shared + [1, 2])
    scheduler.add(first)
    scheduler.update(scheduler.schedule(), [7])
    first_pages = list(first.page_ids)
    run_to_completion(scheduler)
    second = make_request(1, shared + [3, 4, 5])
    scheduler.add(second)
    batch = scheduler.schedule()
    assert second.num_cached_tokens == 8 and batch.num_new_tokens == [5]
    assert second.page_ids[:2] == first_pages[:2]  # the very same pages, taken back from the cache
    scheduler.update(batch, [9])
    run_to_completion(scheduler)
    exact = make_request(2, shared[:8])  # a strict prefix of both: its last page is recomputed
    scheduler.add(exact)
    batch = scheduler.schedule()
    assert exact.num_cached_tokens == 4 and batch.num_new_tokens == [4]
    run_to_completion(scheduler)
    # queries: 2 usable pages of the first prompt, 3 of the second, 1 of the strict prefix
    assert scheduler.prefix_cache_hits == 8 + 4 and scheduler.prefix_cache_queries == 8 + 12 + 4
    assert pages.num_free_pages == pages.num_pages


def test_different_salts_never_share():
    pages = PageManager(32, PAGE, enable_prefix_caching=True)
    scheduler = Scheduler(pages, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    prompt = list(range(50, 70))
    scheduler.add(make_request(0, prompt, salt="alice"))
    run_to_completion(scheduler)
    for rid, salt, expected in [(1, "bob", 0), (2, None, 0), (3, "alice", 16)]:
        request = make_request(rid, prompt, salt=salt)
        scheduler.add(request)
        scheduler.schedule()
        assert request.num_cached_tokens == expected, salt
        scheduler.finish(request, "abort")


def check_invariants(scheduler: Scheduler):
    pages = scheduler.pages
    live = scheduler.running + [r for r in scheduler.waiting if r.page_ids]
    holders = np.zeros(pages.num_pages, int)
    for request in live:
        assert len(set(request.page_ids)) == len(request.page_ids)
        holders[request.page_ids] += 1
    assert list(holders) == pages.refcounts  # refcounts are exact: nothing freed while referenced
    free, cached = set(pages.free_pages), set(pages.evictable)
    assert len(free) == len(pages.free_pages) and not free & cached
    for page in range(pages.num_pages):
        if pages.refcounts[page] == 0:
            assert (page in free) != (page in cached)
            assert (pages.hash_of_page[page] is not None) == (page in cached)
        else:
            assert page not in free and page not in cached
    for h, page in pages.page_by_hash.items():
        assert pages.hash_of_page[page] == h
    for request in scheduler.running:  # a running request's cached prefix is really its prefix
        hashes = page_hashes(request.all_token_ids, PAGE, request.cache_salt)
        for i, page in enumerate(request.page_ids[:request.num_registered_pages]):
            assert pages.hash_of_page[page] in (None, hashes[i])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_churn_with_heavy_sharing(seed):
    rng = np.random.default_rng(seed)
    pages = PageManager(12, PAGE, enable_prefix_caching=True)
    scheduler = Scheduler(pages, max_num_seqs=6, max_num_batched_tokens=16, max_model_len=48)
    prefixes = [rng.integers(0, 50, int(n)).tolist() for n in (5, 8, 13)]
    requests, next_id = [], 0
    for _ in range(1000):
        op = rng.random()
        if op < 0.3:
            prefix = prefixes[rng.integers(len(prefixes))]
            tokens = prefix[:rng.integers(1, len(prefix) + 1)] + rng.integers(0, 50, rng.integers(0, 6)).tolist()
            salt = [None, "s"][rng.integers(2)]
            request = make_request(next_id, tokens, int(rng.integers(1, 12)), salt)
            next_id += 1
            scheduler.add(request)
            requests.append(request)
        elif op < 0.85:
            batch = scheduler.schedule()
            scheduler.update(batch, rng.integers(0, 50, len(batch)).tolist())
        else:
            alive = [r for r in requests if not r.finished]
            if alive:
                scheduler.finish(alive[rng.integers(len(alive))], "abort")
        check_invariants(scheduler)
    assert scheduler.num_preemptions > 0 and scheduler.prefix_cache_hits > 0
    run_to_completion(scheduler)
    check_invariants(scheduler)
    assert all(r.status is Status.FINISHED and not r.page_ids for r in requests)
    assert all(count == 0 for count in pages.refcounts)
    assert pages.num_free_pages == pages.num_pages


def test_reset_prefix_cache_forgets_cached_pages_only_when_idle():
    pages = PageManager(4, PAGE, enable_prefix_caching=True)
    hashes = page_hashes(list(range(8)), PAGE, None)
    owned = pages.allocate(2)
    for page, h in zip(owned, hashes):
        pages.register(page, h)
    assert not pages.reset_prefix_cache()  # in use: nothing changes
    assert pages.lookup(hashes) == owned
    pages.free(owned)
    pages.free(owned)
    assert len(pages.evictable) == 2
    assert pages.reset_prefix_cache()
    assert pages.lookup(hashes) == [] and not pages.evictable
    assert sorted(pages.free_pages) == [0, 1, 2, 3] and pages.num_free_pages == 4
    assert sorted(pages.allocate(4)) == [0, 1, 2, 3]
