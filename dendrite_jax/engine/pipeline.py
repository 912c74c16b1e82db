"""Launch pipeline: the device calls of planned steps, in order, one step ahead of the host.

The engine launches step N+1 before it reads step N's results, so the device runs while the
host applies tokens and plans. A step whose token mask depends on the step in flight (a
host-matched constraint) is "ahead": planned, its forward launched if it splits, its sampling
launched once the mask is filled. Calls go through the `Launcher` in order, from its worker
thread where `threads` says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.launcher import Launcher
from dendrite_jax.engine.runner import ModelRunner, splittable, to_host
from dendrite_jax.engine.scheduler import ScheduledBatch
from dendrite_jax.engine.step_output import StepResult
from dendrite_jax.engine.step_plan import StepPlan, StepShape

THREADED_MIN_ROWS = 16  # see `LaunchPipeline.threads`


def _result(x: Any) -> Any:
    """A launch's output: the value itself, or what its future holds (launcher calls)."""
    return x.result() if isinstance(x, Future) else x


@dataclasses.dataclass
class Launched:
    """A step on the device: its batch, plan, and output (or the future of one)."""

    batch: ScheduledBatch
    plan: StepPlan
    out: Any


@dataclasses.dataclass
class Ahead:
    """A planned step whose sampling waits for its mask; `forward` is its launched forward
    half where it splits."""

    batch: ScheduledBatch
    plan: StepPlan
    forward: Future | None


class LaunchPipeline:
    """Launches planned steps and reads back their results. Invariant: at most one step is in
    flight (`in_flight`) and at most one is ahead (`ahead`); calls reach the device in the
    order they were made."""

    def __init__(self, runner: ModelRunner, cfg: EngineConfig) -> None:
        self.runner = runner
        self.cfg = cfg  # resolved (`EngineConfig.resolve`)
        self.launcher = Launcher()
        self.in_flight: Launched | None = None
        self.ahead: Ahead | None = None
        self.wait_seconds = 0.0  # blocked reading results
        self.launch_seconds = 0.0  # inside the runner's calls: transfer, dispatch

    @property
    def busy(self) -> bool:
        return self.in_flight is not None or self.ahead is not None

    def sync(self) -> None:
        """Wait until every queued call has been made."""
        self.launcher.sync()

    def launch(self, batch: ScheduledBatch, plan: StepPlan, mask: np.ndarray | None) -> Launched:
        """Launch a whole step from this thread (after any queued calls)."""
        self.launcher.sync()
        self.runner.copy_pages([s for s, _ in batch.copies], [d for _, d in batch.copies])
        start = time.perf_counter()
        launched = Launched(batch, plan, self.runner.launch(plan, mask))
        self.launch_seconds += time.perf_counter() - start
        return launched

    def launch_ahead(self, batch: ScheduledBatch, plan: StepPlan) -> None:
        """Hold a planned step whose mask is not known yet: copy its pages, and launch its
        forward now if it splits."""
        if batch.copies:
            self._call(plan, self.runner.copy_pages, [s for s, _ in batch.copies],
                       [d for _, d in batch.copies])
        forward = (self._call(plan, self.runner.launch_forward, plan)
                   if self.splits(plan.shape) else None)
        self.ahead = Ahead(batch, plan, forward)

    def release_ahead(self, mask: Callable[[ScheduledBatch, StepPlan], np.ndarray | None]
                      ) -> None:
        """Fill the step ahead's mask and launch its sampling (or the whole step); it becomes
        the step in flight."""
        ahead, self.ahead = self.ahead, None
        m = mask(ahead.batch, ahead.plan)
        out = (self._call(ahead.plan, self.runner.launch, ahead.plan, m)
               if ahead.forward is None else
               self._call(ahead.plan, self.runner.launch_sample, ahead.plan, ahead.forward, m))
        self.in_flight = Launched(ahead.batch, ahead.plan, out)

    def swap(self, launched: Launched | None) -> Launched | None:
        """Put `launched` in flight; return the step that was."""
        previous, self.in_flight = self.in_flight, launched
        return previous

    def results(self, launched: Launched) -> list[StepResult]:
        """A launched step's results on the host (one per step of a burst), waiting for them."""
        start = time.perf_counter()
        results = to_host(launched.plan.shape, _result(launched.out))
        self.wait_seconds += time.perf_counter() - start
        return results

    def _call(self, plan: StepPlan, fn, *args) -> Future:
        """`fn(*args)` for `plan`'s step through the launcher, in order; futures among the
        args are resolved first (the calls before have run by then)."""
        def call():
            start = time.perf_counter()
            try:
                return fn(*(_result(a) for a in args))
            finally:
                self.launch_seconds += time.perf_counter() - start
        return self.launcher.submit(call, threaded=self.threads(plan.shape))

    def threads(self, shape: StepShape) -> bool:
        """Whether a constrained step's calls are made from the launcher's worker thread
        (`EngineConfig.threaded_launch`). Unset (accelerators, by default): for steps of at
        least `THREADED_MIN_ROWS` rows, where the host's work per step (advancing many
        matchers, filling their masks, planning) outlasts the device's and the thread overlaps
        it with the calls; with few rows the hand-offs cost more than the overlap gains."""
        if self.cfg.threaded_launch is not None:
            return self.cfg.threaded_launch
        return shape.num_seqs >= THREADED_MIN_ROWS

    def splits(self, shape: StepShape) -> bool:
        """Whether a constrained step of this shape launches in two halves
        (`EngineConfig.split_constrained_steps`, off by default). Split steps compile two more
        programs per step shape at warm-up, and the constraints that decode at length on
        accelerators (regular ones) run as device automata, which need no host mask to
        overlap. Mixed steps split only with `forced_tokens`, whose multi-token rows make most
        constrained steps mixed."""
        if not self.cfg.split_constrained_steps or not splittable(shape):
            return False
        return shape.decode_only or self.cfg.forced_tokens
