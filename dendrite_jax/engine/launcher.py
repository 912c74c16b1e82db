"""Launcher: issues the model runner's device calls in order, inline or from a worker thread.

On a GPU an executable call costs the host about as long as the 1B shape's step takes the
device (mostly inside PJRT, with the GIL released), and a
constrained step makes two (the forward, then the sampling with the token mask). Made from a
worker thread they overlap the engine thread's own work for the step: reading the last tokens
back, advancing the matchers, filling the mask and planning the next step.

Invariant: calls run in submission order, whichever way each is made; while calls are queued
for the worker, only the worker touches the runner (the engine calls `sync` before using the
runner directly).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Launcher:
    """Runs submitted calls one at a time in submission order, each either on a worker thread
    (started on first use) or at once in the caller's thread; `submit` returns a future
    either way."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._last: concurrent.futures.Future | None = None

    def submit(self, fn: Callable[[], T], *, threaded: bool) -> concurrent.futures.Future[T]:
        if threaded:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="dendrite-launch")
            self._last = self._pool.submit(fn)
            return self._last
        self.sync()  # calls queued before this one run first
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn())
        except Exception as e:  # raised where the result is taken, as from the worker
            future.set_exception(e)
        return future

    def sync(self) -> None:
        """Wait until every submitted call has run (their errors stay with their futures)."""
        if self._last is not None:
            concurrent.futures.wait([self._last])
            self._last = None
