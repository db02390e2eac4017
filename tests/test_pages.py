"""PageManager: the host free list and refcounts behind every page table. Pure Python, no JAX."""

import pytest

from jaxpaged.pages import OutOfPages, PageManager


def assert_consistent(pages: PageManager):
    """Free pages have refcount 0 and sit in the free list once; every other page has refcount > 0."""
    free = list(pages.free_pages)
    assert len(free) == len(set(free))
    for page in range(pages.num_pages):
        if page in free:
            assert pages.refcounts[page] == 0, page
        else:
            assert pages.refcounts[page] > 0, page
    assert pages.num_free_pages == len(free)


def test_starts_empty():
    pages = PageManager(num_pages=8, page_size=4)
    assert pages.num_free_pages == 8
    assert pages.usage == 0.0
    assert sorted(pages.free_pages) == list(range(8))
    assert pages.refcounts == [0] * 8


@pytest.mark.parametrize("num_pages", [0, -3])
def test_rejects_empty_pool(num_pages):
    with pytest.raises(ValueError, match="num_pages must be positive"):
        PageManager(num_pages=num_pages, page_size=4)


def test_allocate_hands_out_distinct_pages_with_refcount_one():
    pages = PageManager(num_pages=8, page_size=4)
    first = pages.allocate(3)
    second = pages.allocate(2)
    assert len(first) == 3 and len(second) == 2
    assert len(set(first + second)) == 5
    assert all(pages.refcounts[p] == 1 for p in first + second)
    assert not set(first + second) & set(pages.free_pages)
    assert pages.num_free_pages == 3
    assert pages.usage == pytest.approx(5 / 8)
    assert pages.allocate(0) == []
    assert pages.num_free_pages == 3
    assert_consistent(pages)


def test_out_of_pages_allocates_nothing():
    pages = PageManager(num_pages=4, page_size=4)
    held = pages.allocate(3)
    with pytest.raises(OutOfPages, match="asked for 2 pages, 1 free"):
        pages.allocate(2)
    # A failed request must not leak a partial allocation.
    assert pages.num_free_pages == 1
    assert [pages.refcounts[p] for p in held] == [1, 1, 1]
    assert_consistent(pages)
    assert len(pages.allocate(1)) == 1
    with pytest.raises(OutOfPages):
        pages.allocate(1)


def test_free_returns_pages_for_reuse():
    pages = PageManager(num_pages=4, page_size=4)
    held = pages.allocate(4)
    assert pages.usage == 1.0
    pages.free(held[:2])
    assert pages.num_free_pages == 2
    assert pages.usage == pytest.approx(0.5)
    assert all(pages.refcounts[p] == 0 for p in held[:2])
    assert_consistent(pages)
    again = pages.allocate(2)
    assert sorted(again) == sorted(held[:2])
    pages.free(again + held[2:])
    assert pages.num_free_pages == 4 and pages.usage == 0.0
    assert_consistent(pages)


def test_double_free_raises_and_leaves_the_pool_intact():
    pages = PageManager(num_pages=4, page_size=4)
    [page] = pages.allocate(1)
    pages.free([page])
    with pytest.raises(ValueError, match=f"page {page} freed twice"):
        pages.free([page])
    assert pages.refcounts[page] == 0
    assert list(pages.free_pages).count(page) == 1
    assert pages.num_free_pages == 4
    assert_consistent(pages)


def test_freeing_a_never_allocated_page_raises():
    pages = PageManager(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="freed twice"):
        pages.free([2])
    assert pages.num_free_pages == 4


def test_shared_page_is_freed_only_by_its_last_owner():
    pages = PageManager(num_pages=4, page_size=4)
    held = pages.allocate(2)
    pages.share(held)
    pages.share(held[:1])
    assert [pages.refcounts[p] for p in held] == [3, 2]
    pages.free(held)
    assert [pages.refcounts[p] for p in held] == [2, 1]
    assert pages.num_free_pages == 2
    pages.free(held)
    assert [pages.refcounts[p] for p in held] == [1, 0]
    assert pages.num_free_pages == 3
    pages.free(held[:1])
    assert pages.num_free_pages == 4
    assert_consistent(pages)


def test_sharing_a_free_page_raises():
    pages = PageManager(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="page 1 is free and cannot be shared"):
        pages.share([1])
    assert pages.refcounts[1] == 0
    assert pages.num_free_pages == 4


@pytest.mark.parametrize("num_tokens, num_owned, expected", [
    (0, 0, 0),
    (1, 0, 1),
    (4, 0, 1),  # exactly one full page
    (5, 0, 2),
    (8, 0, 2),
    (9, 0, 3),
    (5, 1, 1),
    (8, 2, 0),
    (9, 2, 1),
    (13, 2, 2),
    (3, 2, 0),  # already owns more than needed: never negative
])
def test_pages_needed(num_tokens, num_owned, expected):
    pages = PageManager(num_pages=16, page_size=4)
    assert pages.pages_needed(num_tokens, num_owned) == expected


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_pages_needed_is_ceil_division(page_size):
    pages = PageManager(num_pages=4, page_size=page_size)
    for num_tokens in range(0, 5 * page_size + 2):
        assert pages.pages_needed(num_tokens, 0) == -(-num_tokens // page_size)
        assert pages.pages_needed(num_tokens, 0) * page_size >= num_tokens
