"""AsyncEngine's bookkeeping on a tiny random model: a request counts once toward `pending`
while the engine thread admits it, and submissions outlive a crashed engine thread with an error
instead of waiting forever."""

from __future__ import annotations

import asyncio
import time

import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.serve.async_engine import AsyncEngine, QueueFull

PARAMS = SamplingParams(max_tokens=3, temperature=0)


@pytest.fixture(scope="module")
def llm():
    return LLM(model="tiny-random", max_num_seqs=4, num_pages=64, compilation_cache=False)


def _last_finish_reason(deltas) -> str | None:
    async def last():
        reason = None
        async for delta in deltas:
            reason = delta.finish_reason
        return reason
    return last()


def test_admission_counts_a_request_once(llm):
    async def scenario():
        engine = AsyncEngine(llm, max_pending=2)
        try:
            first = asyncio.ensure_future(engine.submit(None, [1, 2, 3], PARAMS))
            await asyncio.sleep(0)  # the submission is in the inbox
            # Block the event loop while the engine thread admits it: the coroutine cannot
            # resume, so the request is admitted but its submit() has not returned.
            deadline = time.time() + 30
            while not engine._streams and time.time() < deadline:
                time.sleep(0.01)
            assert engine._streams, "the engine thread did not admit the request"
            assert engine.pending == 1
            second = await engine.submit(None, [4, 5], PARAMS)  # the limit is 2: admitted
            with pytest.raises(QueueFull, match="2 requests pending"):
                await engine.submit(None, [6], PARAMS)
            _, deltas = await first
            assert await _last_finish_reason(deltas) == "length"
            assert await _last_finish_reason(second[1]) == "length"
            assert engine.pending == 0
        finally:
            engine.stop()
    asyncio.run(scenario())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_engine_thread_fails_waiting_submissions(llm, monkeypatch):
    async def scenario():
        engine = AsyncEngine(llm)
        try:
            _, deltas = await engine.submit(None, [1, 2, 3], PARAMS)
            assert await _last_finish_reason(deltas) == "length"

            def broken(*args, **kwargs):
                raise KeyError("not a validation error")
            monkeypatch.setattr(llm.engine, "make_request", broken)
            with pytest.raises(RuntimeError, match="the engine has stopped.*KeyError"):
                await asyncio.wait_for(engine.submit(None, [1, 2], PARAMS), timeout=30)
            assert not engine.alive
            with pytest.raises(RuntimeError, match="the engine has stopped"):
                await engine.submit(None, [1, 2], PARAMS)
        finally:
            engine.stop()
    asyncio.run(scenario())


def test_a_caller_that_leaves_while_admitting_aborts_its_request(llm):
    """A submission cancelled before its verdict (a client that disconnects at once): the
    request, admitted or not, does not run on without anyone to read it."""
    async def scenario():
        engine = AsyncEngine(llm)
        try:
            before = engine.counters.requests["abort"]
            task = asyncio.ensure_future(engine.submit(None, [1, 2, 3], SamplingParams(
                max_tokens=50, temperature=0, ignore_eos=True)))
            await asyncio.sleep(0)  # the submission is in the inbox
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.time() + 30
            while engine.pending:
                assert time.time() < deadline, "the request was left running"
                await asyncio.sleep(0.01)
            assert engine.counters.requests["abort"] == before + 1
            assert engine.counters.requests["length"] == 0
            assert llm.engine.pool.stats().used == 0
        finally:
            engine.stop()
    asyncio.run(scenario())
