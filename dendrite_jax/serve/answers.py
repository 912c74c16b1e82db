"""Answering one admitted completion or chat request from its request group's deltas: the whole
answer once every choice has ended, or server-sent events as deltas arrive.

Both read the same pieces (`responses.Piece`): a choice's generated text, tokens and logprobs,
led by the prompt where the request echoes it, read for tool calls where the request has tools,
so a stream's chunks join to the whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from starlette.requests import Request

from dendrite_jax.frontend.streaming import CompletionDelta
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve.errors import ApiError
from dendrite_jax.serve.protocol import Parsed
from dendrite_jax.serve.responses import (
    ChatShapes,
    ChoiceState,
    CompletionShapes,
    Piece,
    assistant_message,
    tool_chunks,
)

DISCONNECT_POLL_S = 0.1


def request_error(final: CompletionDelta, parsed: Parsed) -> ApiError:
    """The error ending a request: its own failure (a constraint that broke mid-generation) is
    a 400 naming the constraint's field; no output means the engine thread died (500)."""
    if final.output is None or not final.output.error:
        return ApiError(500, "the engine stopped while running this request (see /health)",
                        kind="server_error", code="engine_stopped")
    return ApiError(400, final.output.error, parsed.constraint_field, code="request_failed")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def collect(deltas: AsyncIterator[CompletionDelta], request: Request,
                  completions: int) -> list[CompletionDelta] | None:
    """Each completion's last delta, by index, or None if the client went away first."""
    async def run() -> list[CompletionDelta]:
        finals: dict[int, CompletionDelta] = {}
        async for d in deltas:
            if d.finish_reason is not None:
                finals[d.index] = d
        if len(finals) != completions:
            raise RuntimeError("the engine ended a request without its final delta")
        return [finals[i] for i in range(completions)]

    task = asyncio.ensure_future(run())
    while not task.done():
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


class Answer:
    """One request's answer in its route's shapes (`shapes`), under response id `rid`."""

    def __init__(self, parsed: Parsed, shapes: CompletionShapes | ChatShapes, rid: str,
                 tokenizer: Tokenizer) -> None:
        self.parsed, self.shapes, self.rid, self.tokenizer = parsed, shapes, rid, tokenizer

    def _prompt(self, prompt_logprobs: list | None) -> Piece:
        """The prompt as an echoed completion shows it before its generated text."""
        p = self.parsed
        text = p.prompt if p.prompt is not None else self.tokenizer.decode(
            p.prompt_ids, skip_special_tokens=False)
        logprobs = None if p.logprobs is None else list(prompt_logprobs or [None])
        return Piece(text, list(p.prompt_ids), logprobs)

    def _shown(self, generated: Piece, prompt_logprobs: list | None, first: bool) -> Piece:
        """What a choice shows: its generated piece (nothing where echo with max_tokens 0
        generated a token only to score the prompt), led by the prompt on its first piece
        where the request echoes it."""
        p = self.parsed
        if p.echo_only:
            generated = Piece("", [], None if p.logprobs is None else [])
        return self._prompt(prompt_logprobs) + generated if p.echo and first else generated

    def whole(self, finals: list[CompletionDelta]) -> dict:
        """The answer body from each choice's last delta (none of them an error)."""
        p, shapes = self.parsed, self.shapes
        choices, generated = [], 0
        for i, d in enumerate(finals):
            out = d.output
            piece = self._shown(Piece(out.text, out.token_ids, out.logprobs),
                                out.prompt_logprobs, first=True)
            generated += 0 if p.echo_only else len(out.token_ids)
            if p.tools.parser is None:
                choices.append(shapes.choice(i, piece, d.finish_reason, ChoiceState()))
                continue
            calls = p.tools.parse(out.text)
            choices.append(shapes.choice(i, piece, p.tools.finish_reason(d.finish_reason, calls),
                                         ChoiceState(), message=assistant_message(calls)))
        return shapes.body(self.rid, choices, len(p.prompt_ids), generated)

    async def stream(self, deltas: AsyncIterator[CompletionDelta],
                     chat: bool) -> AsyncIterator[bytes]:
        """The answer's server-sent events: chat's role chunks, a chunk per delta with
        something to show (choices interleaved by index), an error event if the request
        fails, the usage chunk where asked, and [DONE]."""
        p, shapes, rid = self.parsed, self.shapes, self.rid
        n = p.params.n
        states = [ChoiceState() for _ in range(n)]
        calls = [p.tools.stream() for _ in range(n)] if p.tools.parser is not None else None
        if chat:
            for i in range(n):
                yield sse(shapes.role_chunk(rid, i))
        async for d in deltas:
            if d.finish_reason == "error":
                yield sse(request_error(d, p).body())
                yield sse("[DONE]")
                return
            state = states[d.index]
            piece = self._shown(Piece(d.text, d.token_ids, d.logprobs), d.prompt_logprobs,
                                first=not state.started)
            state.started = True
            state.tokens += len(d.token_ids)
            if calls is not None:
                for chunk in tool_chunks(shapes, rid, d, piece, state, calls[d.index], p.tools):
                    yield sse(chunk)
            elif (piece.text or d.finish_reason is not None
                  or (piece.token_ids and p.logprobs is not None)):
                yield sse(shapes.chunk(rid, [shapes.chunk_choice(d.index, piece,
                                                                 d.finish_reason, state)]))
        if p.include_usage:
            generated = 0 if p.echo_only else sum(s.tokens for s in states)
            yield sse(shapes.usage_chunk(rid, len(p.prompt_ids), generated))
        yield sse("[DONE]")
