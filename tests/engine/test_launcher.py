"""The launcher runs calls in submission order, threaded or inline, and keeps their errors."""

from __future__ import annotations

import threading
import time

import pytest

from dendrite_jax.engine.launcher import Launcher


def test_calls_run_in_submission_order_whichever_way_each_is_made():
    launcher, order, threads = Launcher(), [], set()

    def call(i: int, delay: float = 0.0):
        def run():
            time.sleep(delay)  # a slow queued call must still finish before later ones start
            order.append(i)
            threads.add(threading.current_thread().name)
            return i
        return run

    futures = [launcher.submit(call(0, 0.05), threaded=True),
               launcher.submit(call(1), threaded=True),
               launcher.submit(call(2), threaded=False),  # waits for 0 and 1
               launcher.submit(call(3, 0.02), threaded=True)]
    assert order[:3] == [0, 1, 2]
    launcher.sync()
    assert order == [0, 1, 2, 3] and [f.result() for f in futures] == [0, 1, 2, 3]
    assert threads == {"dendrite-launch_0", threading.current_thread().name}


def test_errors_stay_with_their_calls():
    launcher = Launcher()

    def fail():
        raise RuntimeError("device call failed")

    for threaded in (True, False):
        failed = launcher.submit(fail, threaded=threaded)
        after = launcher.submit(lambda: "next", threaded=threaded)
        with pytest.raises(RuntimeError, match="device call failed"):
            failed.result()
        assert after.result() == "next"
