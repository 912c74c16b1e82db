"""AsyncEngine's bookkeeping on a tiny random model: a request counts once toward `pending`
while the engine thread admits it, submissions outlive a crashed engine thread with an error
instead of waiting forever, and an n/best_of group streams its completions by index (the same
tokens as `LLM.generate`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.frontend.streaming import CompletionDelta
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


def _run_group(llm: LLM, params: SamplingParams, prompt: list[int]
               ) -> tuple[str, list[CompletionDelta], AsyncEngine]:
    """Submit one group to a fresh AsyncEngine; its id, every delta it streamed, the engine."""
    async def scenario():
        engine = AsyncEngine(llm)
        try:
            group_id, deltas = await engine.submit(None, prompt, params)
            got = [d async for d in deltas]
            assert engine.pending == 0
            return group_id, got, engine
        finally:
            engine.stop()
    return asyncio.run(scenario())


def test_a_group_streams_each_completion_by_index(llm):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=7, n=3)
    expected = llm.generate([[1, 2, 3]], params)[0].samples
    group_id, deltas, engine = _run_group(llm, params, [1, 2, 3])
    assert sorted({d.index for d in deltas}) == [0, 1, 2]
    assert deltas[0].request_id == group_id
    for i, sample in enumerate(expected):
        mine = [d for d in deltas if d.index == i]
        assert [t for d in mine for t in d.token_ids] == sample.token_ids
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + ["length"]
        assert mine[-1].output.token_ids == sample.token_ids
        assert len({d.request_id for d in mine}) == 1
    assert engine.counters.requests["length"] == 3
    # as vLLM counts: each sibling's prompt (the siblings share the first one's pages)
    assert engine.counters.generation_tokens == 15 and engine.counters.prompt_tokens == 9
    assert llm.engine.pool.stats().used == 0


def test_a_best_of_group_yields_its_n_best_once_all_end(llm):
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=2, best_of=4)
    expected = llm.generate([[4, 5, 6]], params)[0].samples
    _, deltas, engine = _run_group(llm, params, [4, 5, 6])
    assert [d.index for d in deltas] == [0, 1]  # one whole delta per returned completion
    assert [d.output for d in deltas] == [
        dataclasses.replace(e, time_to_first_token=d.output.time_to_first_token,
                            decode_time=d.output.decode_time, request_id=d.output.request_id)
        for d, e in zip(deltas, expected, strict=True)]
    assert [d.token_ids for d in deltas] == [e.token_ids for e in expected]
    assert engine.counters.generation_tokens == 4 * 5  # the candidates not returned too


def test_aborting_a_group_ends_every_completion(llm):
    async def scenario():
        engine = AsyncEngine(llm)
        try:
            group_id, deltas = await engine.submit(None, [1, 2, 3], SamplingParams(
                max_tokens=500, temperature=0, ignore_eos=True, n=2))
            got = [await anext(deltas)]
            engine.abort(group_id)
            got += [d async for d in deltas]
            finals = {d.index: d.finish_reason for d in got if d.finish_reason is not None}
            assert finals == {0: "abort", 1: "abort"}
            assert engine.counters.requests["abort"] == 2 and engine.pending == 0
            deadline = time.time() + 30
            while llm.engine.has_unfinished():  # the step in flight, applied for nothing
                assert time.time() < deadline, "the aborted group kept running"
                await asyncio.sleep(0.01)
            assert llm.engine.pool.stats().used == 0
        finally:
            engine.stop()
    asyncio.run(scenario())


def test_a_group_larger_than_the_queue_is_refused(llm):
    async def scenario():
        engine = AsyncEngine(llm, max_pending=2)
        try:
            with pytest.raises(ValueError, match="3 sequences .* limit of 2 pending"):
                await engine.submit(None, [1], SamplingParams(n=3))
            _, deltas = await engine.submit(None, [1], SamplingParams(n=2, max_tokens=2))
            assert [d.finish_reason async for d in deltas].count("length") == 2
        finally:
            engine.stop()
    asyncio.run(scenario())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crash_ends_every_open_completion_with_an_error(monkeypatch):
    llm = LLM(model="tiny-random", max_num_seqs=4, num_pages=64, compilation_cache=False)

    async def scenario():
        engine = AsyncEngine(llm)
        try:
            _, deltas = await engine.submit(None, [1, 2, 3], SamplingParams(
                max_tokens=500, temperature=0, ignore_eos=True, n=2))
            await anext(deltas)

            def broken():
                raise RuntimeError("device lost")
            monkeypatch.setattr(llm.engine, "step", broken)
            rest = [d async for d in deltas]
            finals = [d for d in rest if d.finish_reason is not None]
            assert sorted(d.index for d in finals) == [0, 1]
            assert all(d.finish_reason == "error" and d.output is None for d in finals)
            assert not engine.alive and engine.pending == 0
        finally:
            engine.stop()
    asyncio.run(scenario())
