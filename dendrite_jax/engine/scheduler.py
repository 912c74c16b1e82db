"""Scheduler: which requests run in the next step, and how many tokens each computes.

Iteration-level (Orca-style) continuous batching. Each step it:
1. gives every running request with one token left a decode row (oldest first);
2. fills the rest of the token budget with prefill chunks: running requests mid-prompt first,
   then waiting requests it can admit (slots free, pages available), longest prompts split
   into chunks, the last chunk cut where that sizes the step to a compiled token count
   instead of padding it (`buckets.prefill_to_fit`);
3. asks the KV block manager (`kv_blocks`) for their pages; where it cannot supply them
   (after evicting unused prefix-cache pages) it preempts the youngest running request, which
   is recomputed later.
With a prefix cache, an admitted request shares the cached pages of its prompt's prefix and
skips their prefill; a request whose next page another running request is computing right now
waits a step so the prefix is computed once. Page accounting is the block manager's alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from dendrite_jax.engine.buckets import prefill_to_fit
from dendrite_jax.engine.kv_blocks import KVBlockManager
from dendrite_jax.engine.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class ScheduledBatch:
    rows: list[tuple[Request, int]]  # (request, tokens it computes); decode rows first
    copies: list[tuple[int, int]]  # (src, dst) pages to copy on device before the step
    num_decode: int = dataclasses.field(init=False)  # rows computing one token
    steps: int = 1  # a burst: every row decodes this many tokens, one per step, in one launch

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_decode", sum(1 for _, n in self.rows if n == 1))


class Scheduler:
    def __init__(self, blocks: KVBlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, share_sibling_prompts: bool = True) -> None:
        """`share_sibling_prompts`: parallel samples read their first sibling's prompt pages
        (off where a slot keeps state of its own positions: a KV cache's full-precision
        tail)."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({max_num_seqs}) so every running request can decode")
        self.blocks = blocks
        self.page_size = blocks.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.share_sibling_prompts = share_sibling_prompts
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the youngest
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------ schedule

    def schedule(self) -> ScheduledBatch:
        copies: list[tuple[int, int]] = []
        decodes = [r for r in self.running if r.num_uncomputed == 1 and not r.exhausted]
        budget = self.max_num_batched_tokens - len(decodes)
        prefills = self._plan_prefill(budget)
        prefills = _first_tokens(prefills, prefill_to_fit(
            len(decodes), sum(n for _, n in prefills), self.max_num_batched_tokens))
        rows: list[tuple[Request, int]] = []
        for r in decodes:
            if r.status is RequestStatus.RUNNING and self._grow(r, r.num_computed + 1):
                rows.append((r, 1))
        for r, n in prefills:
            if r.status is RequestStatus.RUNNING:
                if self._grow(r, r.num_computed + n):
                    rows.append((r, n))
            elif self._admit(r, n, copies):
                rows.append((r, n))
            else:
                break
        rows = [(r, n) for r, n in rows if r.status is RequestStatus.RUNNING]
        rows.sort(key=lambda row: row[1] > 1)  # decode block first (stable)
        return ScheduledBatch(rows, copies)

    def schedule_burst(self, steps: int) -> ScheduledBatch | None:
        """Every running request decoding `steps` tokens in one launch, or None where a burst
        would not do: a waiting request could be admitted (a burst would delay it), a running
        one cannot burst (`Request.can_burst`), or the pages for the burst are not free (a
        burst never evicts or preempts; `schedule` does that)."""
        if not self.running or (self.waiting and len(self.running) < self.max_num_seqs):
            return None
        if not all(r.can_burst(steps) for r in self.running):
            return None
        if not self.blocks.grow_all(self.running, [r.num_computed + steps for r in self.running]):
            return None
        return ScheduledBatch([(r, 1) for r in self.running], [], steps=steps)

    def _plan_prefill(self, budget: int) -> list[tuple[Request, int]]:
        """Prefill rows for this step: (request, tokens). Running requests mid-prompt come
        first, then admissible waiting ones, each taking what is left of the token budget
        (the step's tokens lie on one flat axis: a chunk costs its own tokens, nothing more)."""
        candidates = [(r, r.num_uncomputed) for r in self.running
                      if r.num_uncomputed > 1 and not r.exhausted]
        # Pages reach the cache when a step's results are applied, one step after launch:
        # compare with what each running request has committed, not what it has launched.
        computing = [(r, r.num_cached_pages * self.page_size) for r in self.running]
        free_slots = self.max_num_seqs - len(self.running)
        for r in self.waiting:
            if free_slots == 0:
                break
            if r.num_pending:  # preempted while a step was in flight: wait for its token
                continue
            sibling = self._sibling_hit(r)
            if sibling is None:  # its first sibling is still computing the shared prompt
                continue
            hit = sibling or self._usable_hit(r)
            if not sibling and self._deferred(r, hit, computing):
                continue
            candidates.append((r, r.num_tokens - hit))
            computing.append((r, hit))
            free_slots -= 1
        if not candidates or budget <= 0:
            return []
        rows: list[tuple[Request, int]] = []
        for r, remaining in candidates:
            n = min(remaining, budget)
            if n <= 0:
                break
            rows.append((r, n))
            budget -= n
        return rows

    def _usable_hit(self, r: Request) -> int:
        """Tokens of r's sequence the prefix cache already holds (whole pages), keeping at least
        one token to compute."""
        if not self._may_share(r):
            return 0
        return min(self.blocks.cached_tokens(r.tokens), r.num_tokens - 1)

    def _sibling_hit(self, r: Request) -> int | None:
        """Parallel sampling: tokens r takes from its first sibling's pages (the prompt but its
        last token, which r recomputes to sample its own first token), once that sibling has
        computed the prompt; None while r should wait for it; 0 to compute the prompt itself
        (no sibling, one that is gone, or settings that need every prompt token fed)."""
        donor = r.donor
        if donor is None or _feeds_whole_prompt(r) or not self.share_sibling_prompts:
            return 0
        if donor.status is RequestStatus.RUNNING and donor.num_computed >= len(r.prompt_ids):
            return len(r.prompt_ids) - 1
        if donor.status is RequestStatus.RUNNING or (
                donor.status is RequestStatus.WAITING and donor.num_preemptions == 0):
            return None
        r.donor = None  # finished, aborted or preempted: r computes its own prompt
        return 0

    def _may_share(self, r: Request) -> bool:
        """Whether r may skip prompt tokens the prefix cache holds."""
        return self.blocks.caches_prefixes and not _feeds_whole_prompt(r)

    def _deferred(self, r: Request, hit: int, computing: list[tuple[Request, int]]) -> bool:
        """True if another request (running, or admitted earlier in this step; given with the
        tokens it has computed) is computing the page after r's cached prefix: r waits, and
        finds that page in the cache later, so a prefix shared by requests arriving together is
        computed once."""
        if not self.blocks.caches_prefixes:
            return False
        end = hit - hit % self.page_size + self.page_size
        if end > len(r.prompt_ids):
            return False
        head = r.prompt_ids[:end]
        return any(done < end <= len(q.prompt_ids) and q.prompt_ids[:end] == head
                   for q, done in computing)

    # ------------------------------------------------------------------------------ pages

    def _grow(self, r: Request, num_tokens: int) -> bool:
        """Pages for running request r's `num_tokens`, preempting the youngest running
        requests while the block manager cannot supply them. False if r itself was."""
        while not self.blocks.grow(r, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is r:
                return False
        return True

    def _admit(self, r: Request, n: int, copies: list[tuple[int, int]]) -> bool:
        """Move waiting request r to running with pages for its first n tokens after the
        prefix it shares. Never preempts. False (nothing changed) if the pages are not there."""
        sibling = self._sibling_hit(r)
        if not self.blocks.allocate_prompt(r, n, copies, sibling_tokens=sibling or 0,
                                           share_cache=not sibling and self._may_share(r)):
            return False
        self.waiting.remove(r)
        r.slot = self._free_slots.pop()
        r.new_in_slot = True
        r.status = RequestStatus.RUNNING
        if r.first_scheduled_time is None:  # a preempted request keeps its first
            r.first_scheduled_time = time.perf_counter()
        self.running.append(r)
        return True

    # ------------------------------------------------------------------------------ endings

    def preempt(self, r: Request) -> None:
        """Take r's pages and slot; it waits at the front of the queue to be recomputed."""
        self.running.remove(r)
        self._release(r)
        r.num_computed = 0
        r.num_cached_pages = 0
        r.num_preemptions += 1
        r.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def finish(self, r: Request) -> None:
        """Release a finished request's pages and slot. (A request preempted while its last
        step was in flight finishes from the waiting queue, holding nothing.)"""
        if r in self.running:
            self.running.remove(r)
            self._release(r)
        elif r in self.waiting:
            self.waiting.remove(r)

    def abort(self, r: Request) -> None:
        """Drop a waiting or running request, returning its pages and slot."""
        if r in self.waiting:
            self.waiting.remove(r)
        elif r in self.running:
            self.running.remove(r)
            self._release(r)
        r.abort()

    def _release(self, r: Request) -> None:
        self.blocks.free(r)
        self._free_slots.append(r.slot)
        r.slot = -1


def _feeds_whole_prompt(r: Request) -> bool:
    """Prompt logprobs need every prompt token's logits, and a repetition penalty needs every
    prompt token fed to mark it seen: such a request cannot skip shared prompt tokens."""
    return r.params.prompt_logprobs is not None or r.params.repetition_penalty != 1


def _first_tokens(rows: list[tuple[Request, int]], tokens: int) -> list[tuple[Request, int]]:
    """The rows' first `tokens` tokens, in row order."""
    kept = []
    for r, n in rows:
        if tokens <= 0:
            break
        kept.append((r, min(n, tokens)))
        tokens -= n
    return kept
