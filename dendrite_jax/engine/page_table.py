"""HostPageTable: every slot's page table as one numpy array, kept in step with its request.

A step's page tables are then one gather by slot (`rows(slots, width)`) instead of a Python copy
per row. Invariant: for the request that owns slot s, `table[s, :count[s]] == request.pages`
after `sync`, and columns past `count[s]` are 0. A request's pages only grow while it holds its
slot, so a sync copies just the new pages; a request new to its slot (admitted, or re-admitted
after preemption) rewrites the row.
"""

from __future__ import annotations

import numpy as np

from dendrite_jax.engine.request import Request


class HostPageTable:
    def __init__(self, num_slots: int, max_pages: int) -> None:
        self.table = np.zeros((num_slots, max_pages), np.int32)
        self.count = [0] * num_slots
        self.owner: list[Request | None] = [None] * num_slots

    def sync(self, r: Request) -> None:
        """Bring r's slot row up to date with r.pages."""
        slot, pages = r.slot, r.pages
        if self.owner[slot] is not r or r.new_in_slot or len(pages) < self.count[slot]:
            self.table[slot] = 0
            self.count[slot] = 0
            self.owner[slot] = r
        start = self.count[slot]
        if len(pages) > start:
            self.table[slot, start:len(pages)] = pages[start:]
            self.count[slot] = len(pages)

    def rows(self, slots: list[int], width: int) -> np.ndarray:
        """Page tables [len(slots), width] of these slots."""
        return self.table[slots, :width]
