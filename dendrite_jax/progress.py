"""A quiet progress line for slow start-up work: silent unless it runs longer than a few seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `label: 45% (12/27)` to stderr once `after_seconds` have passed, then on updates."""

    def __init__(self, label: str, total: int, after_seconds: float = 2.0) -> None:
        self.label, self.total, self.after = label, max(total, 1), after_seconds
        self.start = time.perf_counter()
        self.shown = False

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed < self.after and not self.shown:
            return
        self.shown = True
        pct = 100 * done // self.total
        sys.stderr.write(f"\r{self.label}: {pct:3d}% ({done}/{self.total}) {elapsed:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write(f"\r{self.label}: done in {time.perf_counter() - self.start:.1f}s\n")
            sys.stderr.flush()
