"""PagePool: host-side ownership of KV pages by reference count.

Invariant: every page is either on the free list (ref-count 0) or referenced by one or more
owners (sequences, forks, the prefix cache), never both and never lost. A small headroom
(2% by default) is held back from ordinary allocation so copy-on-write can still proceed
when the pool is otherwise full.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence


class PoolExhausted(RuntimeError):
    """Not enough free pages for the request; nothing was allocated."""


@dataclasses.dataclass(frozen=True)
class PoolStats:
    num_pages: int
    free: int
    used: int
    shared: int  # pages with more than one reference
    headroom: int
    high_watermark: int  # most pages ever in use at once
    allocations: int
    cow_copies: int

    @property
    def utilization(self) -> float:
        return self.used / self.num_pages


class PagePool:
    def __init__(self, num_pages: int, headroom_fraction: float = 0.02) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        if not 0 <= headroom_fraction < 1:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction}")
        self.num_pages = num_pages
        self.headroom = math.ceil(num_pages * headroom_fraction) if num_pages > 1 else 0
        self._refs = [0] * num_pages
        # Low ids first: pop() from the end of a reversed list.
        self._free = list(range(num_pages - 1, -1, -1))
        self._high_watermark = 0
        self._allocations = 0
        self._cow_copies = 0

    # ----------------------------------------------------------------------------- queries

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocatable(self) -> int:
        """Pages ordinary allocation may take (free pages beyond the headroom)."""
        return max(0, len(self._free) - self.headroom)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_allocatable

    # ----------------------------------------------------------------------------- changes

    def allocate(self, n: int) -> list[int]:
        """n fresh pages with ref-count 1, or PoolExhausted."""
        return self.allocate_batch([n])[0]

    def allocate_batch(self, counts: Sequence[int]) -> list[list[int]]:
        """Pages for several owners at once: all or nothing."""
        if any(c < 0 for c in counts):
            raise ValueError(f"page counts must be non-negative, got {list(counts)}")
        total = sum(counts)
        if total > self.num_allocatable:
            raise PoolExhausted(f"asked for {total} pages; {self.num_allocatable} allocatable "
                                f"({self.num_free} free, {self.headroom} held as headroom)")
        out = [[self._take() for _ in range(c)] for c in counts]
        self._allocations += total
        return out

    def fork(self, pages: Iterable[int]) -> list[int]:
        """Share pages with a new owner: ref-count up, same ids back."""
        pages = list(pages)
        for p in pages:
            self._check_live(p)
        for p in pages:
            self._refs[p] += 1
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; pages reaching 0 return to the free list."""
        pages = list(pages)
        for p in pages:
            self._check_live(p)
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def free_batch(self, page_lists: Iterable[Iterable[int]]) -> None:
        for pages in page_lists:
            self.free(pages)

    def copy_on_write(self, page: int) -> tuple[int, bool]:
        """Make `page` exclusively owned by the caller before it writes.

        Returns (page, False) when the caller is the sole owner, else (new_page, True): the
        caller's reference moves to a fresh page (which may come from the headroom), and the
        caller must copy the device contents old -> new.
        """
        self._check_live(page)
        if self._refs[page] == 1:
            return page, False
        if not self._free:
            raise PoolExhausted("no free page for copy-on-write")
        new = self._take()
        self._refs[page] -= 1
        self._allocations += 1
        self._cow_copies += 1
        return new, True

    # ----------------------------------------------------------------------------- internals

    def _take(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        self._high_watermark = max(self._high_watermark, self.num_pages - len(self._free))
        return page

    def _check_live(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"page {page} is out of range [0, {self.num_pages})")
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is not allocated")

    def stats(self) -> PoolStats:
        used = self.num_pages - len(self._free)
        return PoolStats(num_pages=self.num_pages, free=len(self._free), used=used,
                         shared=sum(1 for r in self._refs if r > 1), headroom=self.headroom,
                         high_watermark=self._high_watermark, allocations=self._allocations,
                         cow_copies=self._cow_copies)

    def check_invariants(self) -> None:
        """Raise AssertionError if a page is lost, double-listed or negative."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for page, refs in enumerate(self._refs):
            if refs < 0:
                raise AssertionError(f"page {page} has negative ref-count {refs}")
            if (refs == 0) != (page in free):
                raise AssertionError(f"page {page}: ref-count {refs} but "
                                     f"{'on' if page in free else 'off'} the free list")
