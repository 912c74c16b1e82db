"""KV block manager: the page accounting behind every request's KV cache.

The scheduler decides which requests run; this class decides nothing. It gives a request the
pages its tokens need (evicting unused prefix-cache pages when the pool runs dry), shares a
cached prefix or a sibling's prompt at admission (copy-on-write for a partly shared page),
commits computed pages to the prefix cache and takes pages back. Invariant: each page in a
request's `pages` is one reference in the pool, so `free` returns exactly what was taken.
"""

from __future__ import annotations

import math

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.cache.prefix_cache import PrefixCache
from dendrite_jax.engine.request import PENDING, Request


class KVBlockManager:
    def __init__(self, pool: PagePool, page_size: int,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.pool = pool
        self.page_size = page_size
        self.prefix_cache = prefix_cache

    @property
    def caches_prefixes(self) -> bool:
        return self.prefix_cache is not None

    @property
    def capacity(self) -> int:
        """The most pages one request can ever hold."""
        return self.pool.num_pages - self.pool.headroom

    def pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def cached_tokens(self, tokens: list[int]) -> int:
        """Tokens at the start of `tokens` that the prefix cache holds (whole pages), without
        marking them used: for planning, before anything is admitted."""
        if self.prefix_cache is None:
            return 0
        return len(self.prefix_cache.tree.find_prefix(tokens, touch=False)) * self.page_size

    def _make_room(self, need: int) -> bool:
        """Evict unused cached pages until `need` pages are allocatable; False if they
        cannot be."""
        while need > self.pool.num_allocatable:
            if not (self.prefix_cache and
                    self.prefix_cache.evict_lru(need - self.pool.num_allocatable)):
                return False
        return True

    def grow(self, r: Request, num_tokens: int) -> bool:
        """Give running request r the pages for `num_tokens` tokens, evicting cached pages as
        needed. False (nothing allocated) if the pool cannot supply them."""
        need = self.pages_for(num_tokens) - len(r.pages)
        if need <= 0:
            return True
        if not self._make_room(need):
            return False
        r.pages.extend(self.pool.allocate(need))
        return True

    def grow_all(self, requests: list[Request], num_tokens: list[int]) -> bool:
        """Pages for every request's `num_tokens`, only from free pages (no eviction); False
        (nothing allocated) if they are not all free."""
        extra = [self.pages_for(n) - len(r.pages) for r, n in zip(requests, num_tokens,
                                                                  strict=True)]
        if sum(n for n in extra if n > 0) > self.pool.num_allocatable:
            return False
        for r, n in zip(requests, extra, strict=True):
            if n > 0:
                r.pages.extend(self.pool.allocate(n))
        return True

    def allocate_prompt(self, r: Request, n: int, copies: list[tuple[int, int]], *,
                        sibling_tokens: int = 0, share_cache: bool = False) -> bool:
        """Pages for waiting request r's shared prefix plus its next `n` tokens, and
        `r.num_computed` set to the shared tokens. The prefix is the first `sibling_tokens`
        of its donor's pages, else (with `share_cache`) what the prefix cache holds of its
        tokens, keeping one token to compute. A partly shared last page is copied (the copy
        is appended to `copies`: (src, dst) for the device). False (nothing changed) if the
        pages are not there after eviction."""
        hit, shared = 0, []
        if sibling_tokens:
            hit, shared = sibling_tokens, r.donor.pages[:self.pages_for(sibling_tokens)]
        elif share_cache and self.prefix_cache is not None:
            pages = self.prefix_cache.lookup(r.tokens).pages
            hit = min(len(pages) * self.page_size, r.num_tokens - 1)
            shared = pages[:self.pages_for(hit)]
        # A partly shared last page: r writes its next tokens into its own copy, a page
        # counted here so that copies never run the pool's headroom dry.
        copy = hit % self.page_size != 0
        need = self.pages_for(hit + n) - len(shared) + copy
        self.pool.fork(shared)  # pin before eviction can take them
        if not self._make_room(need):
            self.pool.free(shared)
            return False
        if share_cache and not sibling_tokens and self.prefix_cache is not None:
            self.prefix_cache.record_hit(r.num_tokens, hit)
        r.pages = shared + self.pool.allocate(need - copy)
        if copy:
            last = self.pages_for(hit) - 1
            page, copied = self.pool.copy_on_write(r.pages[last])
            if copied:
                copies.append((r.pages[last], page))
                r.pages[last] = page
        r.num_computed = hit
        r.num_cached_pages = len(shared) if hit % self.page_size == 0 else len(shared) - 1
        return True

    def commit(self, r: Request) -> None:
        """Put r's computed full pages in the prefix cache (as soon as they are computed and
        read back: a page holding a token still in flight waits)."""
        full = r.num_computed // self.page_size
        if self.prefix_cache is None or full <= r.num_cached_pages:
            return
        tokens = r.tokens[:full * self.page_size]
        if PENDING in tokens:
            return
        self.prefix_cache.commit(tokens, r.pages[:full])
        r.num_cached_pages = full

    def free(self, r: Request) -> None:
        """Take back every page r holds."""
        self.release(r.pages)
        r.pages = []

    # Page lists outside requests (beam search's beams hold theirs directly).

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages, evicting cached pages as needed; PoolExhausted if the pool cannot
        supply them."""
        self._make_room(n)
        return self.pool.allocate(n)

    def fork(self, pages: list[int]) -> list[int]:
        """A second holder's reference to `pages` (shared until written: `writable`)."""
        return self.pool.fork(pages)

    def release(self, pages: list[int]) -> None:
        """Give back one holder's reference to each of `pages`."""
        self.pool.free(pages)

    def writable(self, pages: list[int], index: int) -> tuple[int, int] | None:
        """Make `pages[index]` this holder's own before it writes there: None if it already
        is, else the (src, dst) copy the device must make (`pages[index]` becomes dst)."""
        if self.pool.ref_count(pages[index]) == 1:
            return None
        page, copied = self.pool.copy_on_write(pages[index])
        src, pages[index] = pages[index], page
        return (src, page) if copied else None
