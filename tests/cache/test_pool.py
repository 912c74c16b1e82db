"""PagePool: unit tests and a hypothesis state machine over allocate/fork/CoW/free."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dendrite_jax.cache.pool import PagePool, PoolExhausted


def test_headroom_is_reserved_for_copy_on_write():
    pool = PagePool(100)
    assert pool.headroom == 2 and pool.num_allocatable == 98
    pages = pool.allocate(98)
    with pytest.raises(PoolExhausted):
        pool.allocate(1)
    pool.fork(pages[:1])
    new, copied = pool.copy_on_write(pages[0])  # may dip into the headroom
    assert copied and new not in pages
    assert pool.ref_count(pages[0]) == 1 and pool.ref_count(new) == 1


def test_allocate_batch_is_all_or_nothing():
    pool = PagePool(10, headroom_fraction=0.0)
    with pytest.raises(PoolExhausted):
        pool.allocate_batch([4, 7])
    assert pool.num_free == 10
    a, b = pool.allocate_batch([4, 6])
    assert len(set(a) | set(b)) == 10


def test_free_and_stats():
    pool = PagePool(8, headroom_fraction=0.0)
    pages = pool.allocate(5)
    pool.fork(pages[:2])
    stats = pool.stats()
    assert (stats.used, stats.free, stats.shared, stats.high_watermark) == (5, 3, 2, 5)
    pool.free(pages)
    assert pool.stats().used == 2  # forked pages still held once
    pool.free(pages[:2])
    assert pool.stats().used == 0 and pool.stats().high_watermark == 5
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([pages[0]])
    pool.check_invariants()


def test_copy_on_write_of_sole_owner_is_free():
    pool = PagePool(4)
    (page,) = pool.allocate(1)
    assert pool.copy_on_write(page) == (page, False)
    assert pool.stats().cow_copies == 0


class PoolMachine(RuleBasedStateMachine):
    """Owners hold lists of page references; the pool's ref-counts must always agree."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(24, headroom_fraction=0.1)
        self.owners: list[list[int]] = []

    @rule(n=st.integers(0, 8))
    def allocate(self, n):
        if self.pool.can_allocate(n):
            self.owners.append(self.pool.allocate(n))
        else:
            with pytest.raises(PoolExhausted):
                self.pool.allocate(n)

    @rule(counts=st.lists(st.integers(0, 5), max_size=4))
    def allocate_batch(self, counts):
        before = self.pool.num_free
        try:
            self.owners.extend(self.pool.allocate_batch(counts))
        except PoolExhausted:
            assert self.pool.num_free == before

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def fork(self, data):
        owner = data.draw(st.sampled_from(self.owners))
        self.owners.append(self.pool.fork(owner))

    @precondition(lambda self: any(self.owners))
    @rule(data=st.data())
    def copy_on_write(self, data):
        owner = data.draw(st.sampled_from([o for o in self.owners if o]))
        i = data.draw(st.integers(0, len(owner) - 1))
        try:
            owner[i], _ = self.pool.copy_on_write(owner[i])
        except PoolExhausted:
            assert self.pool.num_free == 0

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.owners) - 1))
        self.pool.free(self.owners.pop(i))

    @invariant()
    def ref_counts_match_owners(self):
        self.pool.check_invariants()
        counts = [0] * self.pool.num_pages
        for owner in self.owners:
            for page in owner:
                counts[page] += 1
        assert counts == [self.pool.ref_count(p) for p in range(self.pool.num_pages)]
        # No page is lost: every page is free or referenced.
        assert self.pool.num_free + sum(1 for c in counts if c) == self.pool.num_pages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
