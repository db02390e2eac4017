"""Host page manager: KV-cache pages, reference counts, and the prefix cache.

Plain Python; the device cache only ever sees page ids through page tables. A page is in exactly
one of three states:
- free: refcount 0, holds nothing worth keeping (`free_pages`);
- in use: refcount >= 1, owned by one or more running sequences (shared prefixes);
- cached: refcount 0 but its full KV content is known by hash (`evictable`, LRU order), so a new
  request with the same prefix can take it back instead of recomputing it. Cached pages are
  evicted, least recently released first, only when no free page is left.
"""

import hashlib
from collections import OrderedDict, deque

import numpy as np


class OutOfPages(Exception):
    pass


def page_hashes(token_ids: list[int], page_size: int, salt: str | None, start: int = 0,
                parent: bytes = b"") -> list[bytes]:
    """Chained hashes of the full pages of `token_ids`, from page `start` on.

    Each hash covers the page's tokens, its parent's hash (so equal pages after different
    prefixes differ) and the request's cache salt (so different tenants never share).
    """
    salt_bytes = b"" if salt is None else b"salt:" + salt.encode()
    hashes = []
    for i in range(start, len(token_ids) // page_size):
        tokens = np.asarray(token_ids[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + salt_bytes + tokens).digest()
        hashes.append(parent)
    return hashes


class PageManager:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = False):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.refcounts = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, refcount 0, oldest first
        self.page_by_hash: dict[bytes, int] = {}
        self.hash_of_page: list[bytes | None] = [None] * num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take: free ones plus cached ones it may evict."""
        return len(self.free_pages) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    def pages_needed(self, num_tokens: int, num_owned: int) -> int:
        """Extra pages a sequence holding `num_owned` pages needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - num_owned)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_pages:
            raise OutOfPages(f"asked for {n} pages, {self.num_free_pages} free")
        pages = []
        for _ in range(n):
            if self.free_pages:
                page = self.free_pages.popleft()
            else:  # evict the least recently released cached page
                page, _ = self.evictable.popitem(last=False)
                del self.page_by_hash[self.hash_of_page[page]]
                self.hash_of_page[page] = None
            self.refcounts[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self.refcounts[page] == 0:
                if page not in self.evictable:
                    raise ValueError(f"page {page} is free and cannot be shared")
                del self.evictable[page]
            self.refcounts[page] += 1

    def free(self, pages: list[int]) -> None:
        """Drops one reference to each page. Pass a sequence's pages in order: its tail is
        released first, so its tail is evicted before the prefix that other requests reuse."""
        for page in reversed(pages):
            if self.refcounts[page] <= 0:
                raise ValueError(f"page {page} freed twice")
            self.refcounts[page] -= 1
            if self.refcounts[page] == 0:
                if self.hash_of_page[page] is not None:
                    self.evictable[page] = None
                else:
                    self.free_pages.append(page)

    # ---- prefix cache ------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached page (vLLM's `reset_prefix_cache`); only while no page is in use,
        else changes nothing and returns False."""
        if any(self.refcounts):
            return False
        self.free_pages.extend(self.evictable)
        self.evictable.clear()
        self.page_by_hash.clear()
        self.hash_of_page = [None] * self.num_pages
        return True

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages for the longest run of leading hashes; takes a reference to each."""
        pages = []
        if self.enable_prefix_caching:
            for h in hashes:
                page = self.page_by_hash.get(h)
                if page is None:
                    break
                pages.append(page)
            self.share(pages)
        return pages

    def register(self, page: int, page_hash: bytes) -> bool:
        """Records that `page` (in use, full, computed or being computed by a dispatched step)
        holds the content `page_hash` names; False if it was not recorded."""
        if not self.enable_prefix_caching or self.hash_of_page[page] is not None:
            return False
        if page_hash in self.page_by_hash:
            return False  # the same content was computed twice concurrently; keep the first
        self.page_by_hash[page_hash] = page
        self.hash_of_page[page] = page_hash
        return True

    def unregister(self, page: int) -> None:
        """Forgets what `page` holds (a step that was to compute it never ran)."""
        page_hash = self.hash_of_page[page]
        if page_hash is None:
            return
        del self.page_by_hash[page_hash]
        self.hash_of_page[page] = None
        if page in self.evictable:
            del self.evictable[page]
            self.free_pages.append(page)
