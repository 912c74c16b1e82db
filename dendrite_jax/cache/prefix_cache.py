"""PrefixCache: KV pages of computed prompt prefixes, shared between requests by ref-count.

The cache pins each page it holds with one pool reference. A request that finds a cached
prefix forks those pages (one more reference each) and skips their prefill. Eviction removes
least-recently-used leaf pages that nobody but the cache references, returning them to the pool.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.cache.radix import RadixTree


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    pages: list[int]
    num_tokens: int  # matched tokens: len(pages) * page_size


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int
    lookup_tokens: int
    hit_tokens: int  # tokens whose prefill was skipped (tokens_saved)
    evictions: int  # pages evicted
    cached_pages: int
    cached_only_pages: int  # cached pages no request holds (the cache's reference alone)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    @property
    def tokens_saved(self) -> int:
        return self.hit_tokens


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.page_size = page_size
        self.clock = clock
        self.tree = RadixTree(page_size, capacity_pages=pool.num_pages, clock=clock)
        self._lookups = self._lookup_tokens = self._hit_tokens = self._evictions = 0

    def lookup(self, tokens: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of `tokens`, in full pages. The caller forks the pages it
        keeps and reports the tokens it actually reused with `record_hit`."""
        pages = self.tree.find_prefix(tokens)
        return PrefixHit(pages=pages, num_tokens=len(pages) * self.page_size)

    def record_hit(self, prompt_tokens: int, reused_tokens: int) -> None:
        self._lookups += 1
        self._lookup_tokens += prompt_tokens
        self._hit_tokens += reused_tokens

    def commit(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Cache the full pages of a computed sequence (`pages[i]` holds tokens of page i).

        Invariant: every page in the tree holds exactly one pool reference for the cache. Pages
        already cached under the same tokens stay as they are (a duplicate computed elsewhere is
        not pinned). Returns the number of pages newly pinned."""
        full = min(len(tokens) // self.page_size, len(pages))
        pages = list(pages[:full])
        already = {p for p in pages if p in self.tree}
        in_tree = self.tree.insert(tokens[:full * self.page_size], pages)
        new = [p for p, q in zip(pages, in_tree, strict=True) if p == q and p not in already]
        self.pool.fork(new)
        return len(new)

    def evictable(self) -> int:
        """Pages that eviction could free right now."""
        return sum(1 for leaf in self.tree.leaves() for p in leaf.values
                   if self.pool.ref_count(p) == 1)

    def evict_lru(self, num_pages: int) -> int:
        """Free up to `num_pages` pages, least recently used leaves first. Returns pages freed."""
        return self._evict(num_pages, older_than=None)

    def evict_older_than(self, seconds: float) -> int:
        """Free every unreferenced page last used more than `seconds` ago."""
        return self._evict(None, older_than=self.clock() - seconds)

    def _evict(self, limit: int | None, older_than: float | None) -> int:
        freed = 0
        while limit is None or freed < limit:
            candidates = [leaf for leaf in self.tree.leaves()
                          if self.pool.ref_count(leaf.values[-1]) == 1
                          and (older_than is None or leaf.last_access < older_than)]
            if not candidates:
                break
            leaf = min(candidates, key=lambda n: n.last_access)
            page = leaf.values[-1]  # the deepest page: prefixes stay usable
            self.tree.remove_by_value(page)
            self.pool.free([page])
            freed += 1
            self._evictions += 1
        return freed

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(lookups=self._lookups, lookup_tokens=self._lookup_tokens,
                                hit_tokens=self._hit_tokens, evictions=self._evictions,
                                cached_pages=self.tree.stats().pages,
                                cached_only_pages=sum(1 for p in self.tree.values()
                                                      if self.pool.ref_count(p) == 1))
