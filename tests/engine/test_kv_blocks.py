"""The KV block manager's page accounting under random admissions, growth, commits and frees:
every page is held once per holder, a refused admission changes nothing, shared prefixes are
the cached tokens, and everything comes back."""

from __future__ import annotations

import collections

from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.cache.prefix_cache import PrefixCache
from dendrite_jax.engine.kv_blocks import KVBlockManager
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams

PAGE = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]


def request(i: int, tokens: list[int]) -> Request:
    return Request(str(i), None, tokens, SamplingParams(max_tokens=4), 0, 1024, None, ())


def check(blocks: KVBlockManager, live: list[Request]) -> None:
    """Each page's pool references are its holders: requests plus the prefix cache."""
    blocks.pool.check_invariants()
    holders = collections.Counter(p for r in live for p in r.pages)
    cached = {p for p in range(blocks.pool.num_pages) if p in blocks.prefix_cache.tree}
    for page in set(holders) | cached:
        assert blocks.pool.ref_count(page) == holders[page] + (page in cached)
    assert blocks.pool.stats().used == len(set(holders) | cached)


ops = st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 2),
                         st.lists(st.integers(10, 20), max_size=9), st.integers(1, 8)),
               min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(ops=ops, num_pages=st.integers(4, 24))
def test_pages_are_accounted_for(ops, num_pages):
    pool = PagePool(num_pages, headroom_fraction=0)
    blocks = KVBlockManager(pool, PAGE, PrefixCache(pool, PAGE))
    live: list[Request] = []
    for i, (op, which, tail, n) in enumerate(ops):
        if op == "admit":
            r = request(i, PREFIXES[which] + tail)
            cached = blocks.cached_tokens(r.tokens)
            used, copies = pool.stats().used, []
            n = min(n, r.num_tokens)
            if blocks.allocate_prompt(r, n, copies, share_cache=True):
                # The shared prefix is what the cache held, keeping one token to compute.
                assert r.num_computed == min(cached, r.num_tokens - 1)
                assert len(r.pages) == blocks.pages_for(r.num_computed + n)
                r.num_computed = min(r.num_computed + n, r.num_tokens)
                live.append(r)
            else:
                assert r.pages == [] and pool.stats().used <= used  # only evictions
        elif op == "grow" and live:
            r = live[which % len(live)]
            target = min(r.num_computed + n, r.num_tokens)
            if blocks.grow(r, target):
                assert len(r.pages) >= blocks.pages_for(target)
                r.num_computed = target
        elif op == "free" and live:
            r = live.pop(which % len(live))
            blocks.commit(r)  # its computed full pages stay cached
            blocks.free(r)
            assert r.pages == []
        check(blocks, live)
    for r in live:
        blocks.free(r)
    blocks.prefix_cache.evict_lru(num_pages)
    assert pool.stats().used == 0


def test_a_partly_shared_page_is_copied():
    """A prompt that is a cached sequence plus nothing more recomputes its last token into a
    copy of the last shared page (the cached one is not written)."""
    pool = PagePool(16, headroom_fraction=0)
    blocks = KVBlockManager(pool, PAGE, PrefixCache(pool, PAGE))
    first = request(0, PREFIXES[0])
    assert blocks.allocate_prompt(first, 8, [], share_cache=True)
    first.num_computed = 8
    blocks.commit(first)
    second, copies = request(1, PREFIXES[0]), []
    assert blocks.allocate_prompt(second, 1, copies, share_cache=True)
    assert second.num_computed == 7  # every token but the last is shared
    assert copies == [(first.pages[1], second.pages[1])] and second.pages[0] == first.pages[0]
    assert blocks.prefix_cache.stats().hit_tokens == 7


def test_page_lists_fork_copy_and_evict():
    """Page lists outside requests (beams): a forked list shares its pages until one holder
    writes (that holder gets a copy), and allocation evicts unused cached pages first."""
    pool = PagePool(4, headroom_fraction=0)
    blocks = KVBlockManager(pool, PAGE, PrefixCache(pool, PAGE))
    parent = blocks.allocate(2)
    child = blocks.fork(parent)
    src = parent[0]
    assert blocks.writable(parent, 0) == (src, parent[0])  # both held it: parent copies
    assert pool.ref_count(src) == 1 and parent[0] != child[0] == src
    assert blocks.writable(child, 0) is None  # the child is now the page's only holder
    blocks.release(parent)
    blocks.release(child)
    cached = request(0, PREFIXES[0])
    assert blocks.allocate_prompt(cached, 8, [], share_cache=True)
    cached.num_computed = 8
    blocks.commit(cached)
    blocks.free(cached)  # its two pages stay, held by the prefix cache alone
    assert len(blocks.allocate(4)) == 4  # two of them evicted for this
