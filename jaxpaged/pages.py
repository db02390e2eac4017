"""Host page manager: a free list of KV-cache pages with reference counts.

Plain Python; the device cache only ever sees page ids through page tables. Refcounts let several
sequences share a page (prefix sharing); a page returns to the free list when its count reaches 0.
"""

from collections import deque


class OutOfPages(Exception):
    pass


class PageManager:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcounts = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self.free_pages)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_pages

    def pages_needed(self, num_tokens: int, num_owned: int) -> int:
        """Extra pages a sequence holding `num_owned` pages needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - num_owned)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            raise OutOfPages(f"asked for {n} pages, {len(self.free_pages)} free")
        pages = [self.free_pages.popleft() for _ in range(n)]
        for page in pages:
            self.refcounts[page] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for page in pages:
            if self.refcounts[page] <= 0:
                raise ValueError(f"page {page} is free and cannot be shared")
            self.refcounts[page] += 1

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if self.refcounts[page] <= 0:
                raise ValueError(f"page {page} freed twice")
            self.refcounts[page] -= 1
            if self.refcounts[page] == 0:
                self.free_pages.append(page)
