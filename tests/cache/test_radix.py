"""RadixTree and PrefixCache: page-granular hits, splits, removal, LRU/TTL eviction, stats."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.cache.prefix_cache import PrefixCache
from dendrite_jax.cache.radix import RadixTree


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(*pages, page_size=4):
    """Tokens made of pages given as single ints: page k is [k, k, k, k]."""
    return [t for p in pages for t in [p] * page_size]


def test_prefix_hits_are_page_granular():
    tree = RadixTree(page_size=4)
    tree.insert(seq(1, 2, 3), [10, 11, 12])
    assert tree.find_prefix(seq(1, 2, 3)) == [10, 11, 12]
    assert tree.find_prefix(seq(1, 2, 9)) == [10, 11]
    assert tree.find_prefix(seq(1, 2) + [3, 3]) == [10, 11]  # a partial page never matches
    assert tree.find_prefix(seq(1, 2, 3)[:-1]) == [10, 11]
    assert tree.find_prefix(seq(7)) == []
    assert tree.find_exact(seq(1, 2)) == [10, 11]
    assert tree.find_exact(seq(1, 5)) is None


def test_divergence_splits_an_edge_and_keeps_existing_values():
    tree = RadixTree(page_size=4)
    tree.insert(seq(1, 2, 3), [10, 11, 12])
    assert tree.insert(seq(1, 2, 4, 5), [20, 21, 22, 23]) == [10, 11, 22, 23]
    assert tree.find_prefix(seq(1, 2, 4, 5)) == [10, 11, 22, 23]
    assert tree.find_prefix(seq(1, 2, 3)) == [10, 11, 12]
    stats = tree.stats()
    assert (stats.nodes, stats.pages, stats.tokens) == (3, 5, 20)


def test_remove_by_value_drops_the_page_and_its_descendants():
    tree = RadixTree(page_size=4, capacity_pages=10)
    tree.insert(seq(1, 2, 3), [10, 11, 12])
    tree.insert(seq(1, 2, 4), [10, 11, 13])
    assert sorted(tree.remove_by_value(11)) == [11, 12, 13]
    assert tree.find_prefix(seq(1, 2, 3)) == [10]
    assert 12 not in tree and 10 in tree
    assert tree.stats().utilization == pytest.approx(0.1)
    with pytest.raises(KeyError):
        tree.remove_by_value(99)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=12))
def test_tree_agrees_with_a_dict_of_prefixes(sequences):
    """Every inserted page sequence is found again, with the first value given for each prefix."""
    tree = RadixTree(page_size=2)
    expected: dict[tuple[int, ...], int] = {}
    next_value = 0
    for pages in sequences:
        values = list(range(next_value, next_value + len(pages)))
        next_value += len(pages)
        tree.insert(seq(*pages, page_size=2), values)
        for i in range(len(pages)):
            expected.setdefault(tuple(pages[:i + 1]), values[i])
    for prefix, value in expected.items():
        assert tree.find_prefix(seq(*prefix, page_size=2))[-1] == value
    assert tree.stats().pages == len(expected)


def make_cache(num_pages=16):
    clock = Clock()
    pool = PagePool(num_pages, headroom_fraction=0.0)
    return pool, PrefixCache(pool, page_size=4, clock=clock), clock


def test_commit_pins_pages_and_lookup_shares_them():
    pool, cache, _ = make_cache()
    pages = pool.allocate(3)
    assert cache.commit(seq(1, 2, 3) + [9, 9], pages) == 3  # the partial page is not cached
    assert [pool.ref_count(p) for p in pages] == [2, 2, 2]
    pool.free(pages)  # the request ends: the cache keeps them
    assert pool.stats().used == 3
    hit = cache.lookup(seq(1, 2, 5))
    assert hit.pages == pages[:2] and hit.num_tokens == 8
    assert cache.commit(seq(1, 2, 3), pages) == 0  # already cached: no double pin
    assert [pool.ref_count(p) for p in pages] == [1, 1, 1]


def test_duplicate_computation_is_not_pinned():
    pool, cache, _ = make_cache()
    first, second = pool.allocate(2), pool.allocate(2)
    cache.commit(seq(1, 2), first)
    assert cache.commit(seq(1, 2), second) == 0
    assert [pool.ref_count(p) for p in second] == [1, 1]


def test_lru_eviction_order_and_referenced_pages_stay():
    pool, cache, clock = make_cache()
    a, b, c = pool.allocate(2), pool.allocate(2), pool.allocate(2)
    for tokens, pages, t in ((seq(1, 2), a, 1.0), (seq(3, 4), b, 2.0), (seq(5, 6), c, 3.0)):
        clock.now = t
        cache.commit(tokens, pages)
    pool.free(a)
    pool.free(b)  # c is still used by a running request
    clock.now = 4.0
    cache.lookup(seq(1, 2))  # touch a: b is now the least recently used
    assert cache.evictable() == 4
    assert cache.evict_lru(1) == 1
    assert cache.lookup(seq(3, 4)).pages == b[:1]  # the deepest page of b went first
    assert cache.evict_lru(10) == 3  # the rest of b, then a; c is referenced
    assert cache.lookup(seq(5, 6)).pages == c
    assert pool.stats().used == 2 and cache.stats().evictions == 4
    pool.check_invariants()


def test_ttl_eviction():
    pool, cache, clock = make_cache()
    old, new = pool.allocate(1), pool.allocate(1)
    clock.now = 10.0
    cache.commit(seq(1), old)
    clock.now = 100.0
    cache.commit(seq(2), new)
    pool.free(old)
    pool.free(new)
    clock.now = 105.0
    assert cache.evict_older_than(30.0) == 1
    assert cache.lookup(seq(1)).pages == [] and cache.lookup(seq(2)).pages == new


def test_stats_arithmetic():
    pool, cache, _ = make_cache()
    cache.record_hit(prompt_tokens=100, reused_tokens=64)
    cache.record_hit(prompt_tokens=50, reused_tokens=0)
    stats = cache.stats()
    assert stats.lookups == 2 and stats.tokens_saved == 64
    assert stats.hit_rate == pytest.approx(64 / 150)
