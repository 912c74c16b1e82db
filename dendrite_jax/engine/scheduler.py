"""Scheduler: which requests run in the next step, and how many tokens each computes.

Requests are admitted first-come-first-served while a batch slot is free and the pool can
hold the request's whole length (prompt + max_tokens), so a running request never runs out
of pages. A step is either prefill (chunks of prompts under the token budget) or decode
(one token for every running request); prefill goes first so new requests join the decode
batch quickly.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.engine.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request computes in this step

    @property
    def is_prefill(self) -> bool:
        return any(r.in_prefill for r in self.requests)


class Scheduler:
    def __init__(self, pool: PagePool, *, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))

    def pages_needed(self, request: Request) -> int:
        return math.ceil(request.max_len / self.page_size)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self._free_slots:
            request = self.waiting[0]
            needed = self.pages_needed(request)
            if not self.pool.can_allocate(needed):
                break
            self.waiting.popleft()
            request.pages = self.pool.allocate(needed)
            request.slot = self._free_slots.pop()
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def schedule(self) -> ScheduledBatch:
        """The next step's batch. Raises RuntimeError if requests wait but none can ever run."""
        self._admit()
        if not self.running:
            raise RuntimeError("no request can be admitted: the KV cache is too small for the "
                               "first waiting request")
        prefilling = [r for r in self.running if r.in_prefill]
        if not prefilling:
            return ScheduledBatch(list(self.running), [1] * len(self.running))
        budget = self.max_num_batched_tokens
        requests, counts = [], []
        for r in prefilling:
            n = min(len(r.prompt_ids) - r.num_computed, budget)
            if n <= 0:
                break
            requests.append(r)
            counts.append(n)
            budget -= n
        return ScheduledBatch(requests, counts)

    def finish(self, request: Request) -> None:
        """Release a finished request's pages and slot."""
        self.running.remove(request)
        self._release(request)

    def abort(self, request: Request) -> None:
        """Drop a waiting or running request, returning its pages and slot."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
            self._release(request)
        request.status = RequestStatus.DONE

    def _release(self, request: Request) -> None:
        self.pool.free(request.pages)
        request.pages = []
        self._free_slots.append(request.slot)
        request.slot = -1
