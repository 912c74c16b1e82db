"""AsyncEngine: an LLM's engine run by one background thread, fed by coroutines.

The engine is not thread-safe, so one thread owns it: it takes new submissions and aborts from an
inbox, steps while anything is unfinished, and hands each submission's deltas
(`frontend.streaming`) to the coroutine waiting on them (an asyncio queue per submission, filled
with `call_soon_threadsafe`). A submission is one prompt's request group (`frontend.groups`):
one request, or its n/best_of siblings, whose deltas carry their completion's index. Requests are
validated on the engine thread too (`Engine.make_request`), and the caller awaits the verdict,
so a bad request fails alone with the engine's message. Invariant: a submission's requests count
in `_submitting` until the engine thread admits or rejects them, and an admitted request's id is
in `_streams` until its group's last delta is queued; both change under `_cv`'s lock, admission
moving requests from one to the other at once, so `pending` (their sum) counts each request once
and `submit` refuses past `max_pending` (`QueueFull`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

from dendrite_jax.engine.engine import EngineStats
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.groups import make_group
from dendrite_jax.frontend.llm import LLM
from dendrite_jax.frontend.streaming import CompletionDelta, GroupStream
from dendrite_jax.serve.metrics import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    STEP_BUCKETS,
    TTFT_BUCKETS,
    Histogram,
    token_buckets,
)

STATS_PERIOD_S = 0.25


class QueueFull(RuntimeError):
    """More requests pending than the server admits."""


@dataclasses.dataclass
class _Stream:
    """One submission's way back to its coroutine, and (once admitted) its group's deltas."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    deltas: GroupStream | None = None  # its request group's
    arrival: float = dataclasses.field(default_factory=time.perf_counter)  # when submitted
    # Per request id: (its generated tokens already in the counters, when the last was made),
    # _FINISHED once the request itself is counted.
    counted: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)


_FINISHED = (-1, 0.0)


def _histogram(buckets) -> dataclasses.Field:
    return dataclasses.field(default_factory=lambda: Histogram(buckets))


@dataclasses.dataclass
class ServerCounters:
    """Totals since start, updated on the engine thread (read as a snapshot; exported by
    `serve.metrics`). Per engine request, as vLLM counts: each n/best_of sibling counts.
    Latencies are `time.perf_counter` differences: TTFT and end-to-end from submission, the
    queue time from the engine's admission (`Request.arrival`) to its first scheduling."""

    max_model_len: int  # the token-count histograms' range
    stats: EngineStats  # the engine's: at most STATS_PERIOD_S old while busy
    # finished requests by finish reason (and submissions refused at admission: "rejected")
    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    step: Histogram = _histogram(STEP_BUCKETS)
    ttft: Histogram = _histogram(TTFT_BUCKETS)
    itl: Histogram = _histogram(ITL_BUCKETS)  # one observation per token after the first
    # One observation per finished request: end-to-end and queue time each (one never
    # scheduled: its wait until it ended); prefill (first scheduling to first token), decode
    # (first to last token) and inference (both) each request that made a token.
    e2e: Histogram = _histogram(REQUEST_LATENCY_BUCKETS)
    queue: Histogram = _histogram(REQUEST_LATENCY_BUCKETS)
    prefill: Histogram = _histogram(REQUEST_LATENCY_BUCKETS)
    decode: Histogram = _histogram(REQUEST_LATENCY_BUCKETS)
    inference: Histogram = _histogram(REQUEST_LATENCY_BUCKETS)
    request_prompt_tokens: Histogram = dataclasses.field(init=False)
    request_generation_tokens: Histogram = dataclasses.field(init=False)
    max_generation_tokens: Histogram = dataclasses.field(init=False)  # per request group

    def __post_init__(self) -> None:
        buckets = token_buckets(self.max_model_len)
        self.request_prompt_tokens = Histogram(buckets)
        self.request_generation_tokens = Histogram(buckets)
        self.max_generation_tokens = Histogram(buckets)

    def count_tokens(self, request: Request, arrival: float, counted: int,
                     last_counted: float) -> int:
        """Count `request`'s tokens generated since the first `counted` (the last of which was
        made at `last_counted`; `arrival`: its submission) and their latencies; returns its
        generated tokens. Tokens a step delivers together (a burst, forced tokens) share the
        gap since the previous delivery evenly, one inter-token observation each: the
        histogram then counts every token after a request's first, as vLLM's does when a
        step makes one token, and sums to the request's decode time."""
        generated = len(request.output_ids) - request.num_pending
        new = generated - counted
        if new <= 0:
            return generated
        self.generation_tokens += new
        if counted == 0:
            self.ttft.observe(request.first_token_time - arrival)
            last_counted, new = request.first_token_time, new - 1
        if new:
            self.itl.observe((request.last_token_time - last_counted) / new, new)
        return generated

    def count_finished(self, request: Request, arrival: float, generated: int) -> None:
        """Count finished `request` (submitted at `arrival`, `generated` tokens made)."""
        now = time.perf_counter()
        self.requests[request.finish_reason] += 1
        self.e2e.observe(now - arrival)
        scheduled = request.first_scheduled_time
        self.queue.observe((now if scheduled is None else scheduled) - request.arrival)
        self.request_prompt_tokens.observe(len(request.prompt_ids))
        self.request_generation_tokens.observe(generated)
        first, last = request.first_token_time, request.last_token_time
        if first is not None and scheduled is not None:
            self.prefill.observe(first - scheduled)
            self.decode.observe(last - first)
            self.inference.observe(last - scheduled)


class AsyncEngine:
    def __init__(self, llm: LLM, max_pending: int = 256) -> None:
        self.llm = llm
        self.max_pending = max_pending
        self.counters = ServerCounters(llm.engine.max_model_len, llm.stats())
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._streams: dict[str, _Stream] = {}
        self._submitting = 0
        self._stats_time = time.monotonic()
        self._stopped = False
        self.error: BaseException | None = None  # what killed the engine thread, if anything
        self._thread = threading.Thread(target=self._run, name="dendrite-engine", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._streams) + self._submitting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------- coroutines

    async def submit(self, prompt: str | None, prompt_ids: list[int],
                     params: SamplingParams) -> tuple[str, AsyncIterator[CompletionDelta]]:
        """Admit one prompt's request group (n/best_of: `frontend.groups`); returns its id (for
        `abort`) and its deltas, which end after each of its n completions' last delta. Raises
        ValueError (a bad request, the engine's message), QueueFull, or RuntimeError once the
        engine has stopped."""
        loop = asyncio.get_running_loop()
        verdict: asyncio.Future = loop.create_future()
        stream = _Stream(loop, asyncio.Queue())
        count = params.num_sequences
        if count > self.max_pending:
            raise ValueError(f"{count} sequences (n/best_of) exceed the server's limit of "
                             f"{self.max_pending} pending requests")
        with self._cv:  # the engine thread drains the inbox for good under this lock
            if not self.alive or self._stopped:
                raise RuntimeError(f"the engine has stopped: {self.error!r}")
            pending = len(self._streams) + self._submitting
            if pending + count > self.max_pending:
                raise QueueFull(f"{pending} requests pending (the limit is "
                                f"{self.max_pending}); retry later")
            self._submitting += count  # until _add admits or rejects them
            self._inbox.append(("add", (prompt, prompt_ids, params, stream, verdict)))
            self._cv.notify()
        try:
            request_id = await verdict
        except asyncio.CancelledError:  # the caller left (a disconnect) while admitting
            if verdict.done() and not verdict.cancelled() and verdict.exception() is None:
                self.abort(verdict.result())
            raise
        return request_id, self._deltas(stream, params.n)

    def abort(self, request_id: str) -> None:
        """Stop the request group that `request_id` (the id `submit` returned) belongs to."""
        self._post(("abort", request_id))

    @staticmethod
    async def _deltas(stream: _Stream, completions: int) -> AsyncIterator[CompletionDelta]:
        while completions > 0:
            delta = await stream.queue.get()
            yield delta
            completions -= delta.finish_reason is not None

    def _settle(self, verdict: asyncio.Future, request_id: str | None,
                error: BaseException | None) -> None:
        """On the event loop: a submission's verdict, its id or its error (the first one
        wins). An admitted request whose caller has left is aborted, not left running."""
        if verdict.cancelled():
            if request_id is not None:
                self.abort(request_id)
        elif not verdict.done():
            verdict.set_exception(error) if error else verdict.set_result(request_id)

    def _post(self, item) -> None:
        with self._cv:
            self._inbox.append(item)
            self._cv.notify()

    # ---------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        engine = self.llm.engine
        items: list = []
        try:
            while True:
                with self._cv:
                    if not self._inbox and not engine.has_unfinished():
                        self.counters.stats = engine.stats()  # idle: the metrics' final word
                    while not self._inbox and not engine.has_unfinished() and not self._stopped:
                        self._cv.wait()
                    if self._stopped:
                        return
                    items = list(self._inbox)
                    self._inbox.clear()
                while items:
                    kind, payload = items[0]
                    self._add(*payload) if kind == "add" else self._abort(payload)
                    items.pop(0)  # only once handled: a crash in it still settles its verdict
                if engine.has_unfinished():
                    start = time.perf_counter()
                    changed = engine.step()
                    self._record_step(time.perf_counter() - start)
                    for request in changed:
                        self._emit(request)
        except BaseException as e:  # noqa: BLE001 - reported by /health and every waiter
            with self._cv:  # submissions not yet admitted must not wait forever
                self.error = e
                items += list(self._inbox)
                self._inbox.clear()
            for stream in {id(s): s for s in self._streams.values()}.values():
                self._queue(stream, stream.deltas.close("error"))
            failure = RuntimeError(f"the engine has stopped: {e!r}")
            for kind, payload in items:
                if kind == "add":
                    stream, verdict = payload[3], payload[4]
                    stream.loop.call_soon_threadsafe(self._settle, verdict, None, failure)
            raise

    def _add(self, prompt, prompt_ids, params, stream: _Stream, verdict) -> None:
        try:
            group = make_group(self.llm.engine, prompt, prompt_ids, params)
        except ValueError as e:
            self._reject(stream, verdict, params.num_sequences, e)
            return
        failed = next((r for r in group.requests if r.finished), None)
        if failed is not None:  # a constraint that does not compile: fails alone
            self._reject(stream, verdict, params.num_sequences, ValueError(
                failed.output().error or "the request failed at admission"))
            return
        for request in group.requests:
            self.llm.engine.add(request)
        stream.deltas = GroupStream(group)
        with self._cv:
            self._submitting -= params.num_sequences
            self._streams.update((r.request_id, stream) for r in group.requests)
        self.counters.prompt_tokens += len(prompt_ids) * len(group.requests)
        stream.loop.call_soon_threadsafe(self._settle, verdict, group.request_id, None)

    def _reject(self, stream: _Stream, verdict, count: int, error: ValueError) -> None:
        with self._cv:
            self._submitting -= count
        self.counters.requests["rejected"] += 1
        stream.loop.call_soon_threadsafe(self._settle, verdict, None, error)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        for request in stream.deltas.group.requests:
            if self.llm.engine.abort(request.request_id):
                self._emit(request)  # its last delta, finish reason "abort"

    def _emit(self, request: Request) -> None:
        """Queue what `request`'s group has to stream now that `request` has changed."""
        stream = self._streams.get(request.request_id)
        if stream is None:
            return
        self._count(stream, request)
        deltas = stream.deltas.advance(request)
        if stream.deltas.finished:  # its requests leave `_streams`: siblings' last changes too
            for sibling in stream.deltas.group.requests:
                self._count(stream, sibling)
        self._queue(stream, deltas)

    def _count(self, stream: _Stream, request: Request) -> None:
        """The counters' share of `request`'s change: its new tokens, and once it has
        finished, the request itself (once); its group's largest output once all have."""
        entry = stream.counted.get(request.request_id, (0, 0.0))
        if entry == _FINISHED:
            return
        c = self.counters
        generated = c.count_tokens(request, stream.arrival, *entry)
        if not request.finished:
            stream.counted[request.request_id] = (generated, request.last_token_time or 0.0)
            return
        c.count_finished(request, stream.arrival, generated)
        stream.counted[request.request_id] = _FINISHED
        group = stream.deltas.group.requests
        if all(stream.counted.get(r.request_id) == _FINISHED for r in group):
            c.max_generation_tokens.observe(max(len(r.resolved_output_ids) for r in group))

    def _queue(self, stream: _Stream, deltas: list[CompletionDelta]) -> None:
        """Hand deltas to the stream's coroutine; once its group's last delta is among them,
        its requests leave `_streams` first (`pending` then no longer counts them)."""
        if stream.deltas.finished:
            with self._cv:
                for request in stream.deltas.group.requests:
                    self._streams.pop(request.request_id, None)
        for delta in deltas:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

    def _record_step(self, seconds: float) -> None:
        c = self.counters
        c.step.observe(seconds)
        # The engine's stats walk the page pool: refreshed a few times a second, not per step.
        now = time.monotonic()
        if now - self._stats_time >= STATS_PERIOD_S:
            c.stats, self._stats_time = self.llm.stats(), now
