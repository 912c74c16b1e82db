"""HostPageTable: the per-slot table mirrors each slot's current request through growth,
preemption and slot reuse (random sequences of events checked against the requests' pages)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.engine.page_table import HostPageTable


class FakeRequest:
    def __init__(self, slot: int) -> None:
        self.slot, self.pages, self.new_in_slot = slot, [], True


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["grow", "replace", "readmit"]),
                          st.integers(0, 3), st.integers(1, 5)), max_size=40))
def test_rows_match_the_owning_requests_pages(events):
    num_slots, width = 4, 32
    table = HostPageTable(num_slots, width)
    owners = [FakeRequest(s) for s in range(num_slots)]
    next_page = 1
    for kind, slot, n in events:
        r = owners[slot]
        if kind == "replace":  # another request takes the slot
            r = owners[slot] = FakeRequest(slot)
        elif kind == "readmit":  # preempted and re-admitted: fresh pages, new in slot
            r.pages, r.new_in_slot = [], True
        grow = min(n, width - len(r.pages))
        r.pages = r.pages + list(range(next_page, next_page + grow))
        next_page += grow
        table.sync(r)
        r.new_in_slot = False
        for s, owner in enumerate(owners):
            if table.owner[s] is owner:
                row = table.rows([s], width)[0]
                np.testing.assert_array_equal(row[:len(owner.pages)], owner.pages)
                assert not row[len(owner.pages):].any()


def test_rows_gather_in_the_order_asked():
    table = HostPageTable(3, 8)
    for slot, pages in ((0, [5, 6]), (1, [7]), (2, [8, 9, 10])):
        r = FakeRequest(slot)
        r.pages = pages
        table.sync(r)
    np.testing.assert_array_equal(table.rows([2, 0], 3), [[8, 9, 10], [5, 6, 0]])
