"""OpenAI's answer shapes: whole responses and stream chunks of the completions and chat routes,
each route's logprobs format, and usage.

Tool calls (`serve.tools`) change a chat choice's message (`assistant_message`) and, streamed,
its deltas (`tool_chunks`). A `Piece` is what one choice shows in one answer or chunk: its text,
its tokens and their logprobs. `CompletionShapes` and `ChatShapes` turn pieces into the route's
JSON; a `ChoiceState` per choice carries what a stream must remember between chunks (the
completions format's text offsets). Logprobs of -inf (tokens a constraint forbids) are sent as
LOGPROB_FLOOR, since JSON has no infinity.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable

from dendrite_jax.engine.outputs import Logprob, PositionLogprobs
from dendrite_jax.frontend.streaming import CompletionDelta
from dendrite_jax.serve.tool_parsers import ToolCallStream, ToolOutput
from dendrite_jax.serve.tools import ToolPlan

LOGPROB_FLOOR = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclasses.dataclass(frozen=True)
class Piece:
    """What one choice shows in one answer or chunk. `logprobs`: one entry per token (None
    for a prompt's first token, which has none), or None where logprobs were not asked for."""

    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs | None] | None = None

    def __add__(self, other: Piece) -> Piece:
        logprobs = (None if self.logprobs is None or other.logprobs is None
                    else self.logprobs + other.logprobs)
        return Piece(self.text + other.text, self.token_ids + other.token_ids, logprobs)


@dataclasses.dataclass
class ChoiceState:
    """Per choice, across a stream's chunks."""

    text_offset: int = 0  # characters shown so far (the completions format's text_offset)
    tokens: int = 0  # tokens shown so far (usage)
    started: bool = False  # its first chunk is out


def _floor(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def ranked(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The `k` most likely tokens of a position, most likely first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k),
                  key=lambda item: item[1].rank)[:k]


class _Shapes:
    """What both routes share: the envelope of answers and chunks."""

    body_object = chunk_object = ""

    def __init__(self, model: str, top_logprobs: int | None,
                 decode_token: Callable[[int], str]) -> None:
        self.model = model
        self.top_logprobs = top_logprobs  # None: no logprobs in the answer
        self.decode_token = decode_token
        self.created = int(time.time())

    def _token(self, token_id: int, entry: PositionLogprobs | None) -> str:
        found = entry.get(token_id) if entry else None
        if found is not None and found.decoded_token is not None:
            return found.decoded_token
        return self.decode_token(token_id)

    def body(self, rid: str, choices: list[dict], prompt_tokens: int,
             completion_tokens: int) -> dict:
        return {"id": rid, "object": self.body_object, "created": self.created,
                "model": self.model, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, rid: str, choices: list[dict]) -> dict:
        return {"id": rid, "object": self.chunk_object, "created": self.created,
                "model": self.model, "choices": choices}

    def usage_chunk(self, rid: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self.chunk(rid, []), "usage": usage(prompt_tokens, completion_tokens)}


class CompletionShapes(_Shapes):
    """/v1/completions: `text` per choice; logprobs as tokens, token_logprobs, top_logprobs
    (token text -> logprob) and text_offset."""

    body_object = chunk_object = "text_completion"

    def logprobs(self, piece: Piece, state: ChoiceState) -> dict | None:
        if self.top_logprobs is None or piece.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(piece.token_ids, piece.logprobs, strict=True):
            text = self._token(token_id, entry)
            tokens.append(text)
            offsets.append(state.text_offset)
            state.text_offset += len(text)
            if entry is None:  # a prompt's first token
                values.append(None)
                tops.append(None)
                continue
            values.append(_floor(entry[token_id].logprob))
            tops.append({self._token(t, entry): _floor(lp.logprob)
                         for t, lp in ranked(entry, self.top_logprobs)})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def choice(self, index: int, piece: Piece, finish: str | None,
               state: ChoiceState) -> dict:
        return {"index": index, "text": piece.text, "logprobs": self.logprobs(piece, state),
                "finish_reason": finish}

    chunk_choice = choice


class ChatShapes(_Shapes):
    """/v1/chat/completions: a `message` per choice (`delta` in chunks); logprobs as
    {"content": [{token, logprob, bytes, top_logprobs}]}."""

    body_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def _item(self, token_id: int, entry: PositionLogprobs) -> dict:
        text = self._token(token_id, entry)
        return {"token": text, "logprob": _floor(entry[token_id].logprob),
                "bytes": list(text.encode())}

    def logprobs(self, piece: Piece) -> dict | None:
        if self.top_logprobs is None or piece.logprobs is None:
            return None
        return {"content": [
            {**self._item(token_id, entry),
             "top_logprobs": [self._item(t, entry) for t, _ in ranked(entry, self.top_logprobs)]}
            for token_id, entry in zip(piece.token_ids, piece.logprobs, strict=True)
            if entry is not None]}

    def choice(self, index: int, piece: Piece, finish: str | None, state: ChoiceState,
               message: dict | None = None) -> dict:
        """`message`: the assistant message to send instead of the piece's text (tools)."""
        return {"index": index,
                "message": message or {"role": "assistant", "content": piece.text},
                "logprobs": self.logprobs(piece), "finish_reason": finish}

    def chunk_choice(self, index: int, piece: Piece, finish: str | None, state: ChoiceState,
                     delta: dict | None = None) -> dict:
        """`delta`: the message delta to send instead of the piece's text (tools)."""
        return {"index": index, "delta": {"content": piece.text} if delta is None else delta,
                "logprobs": self.logprobs(piece), "finish_reason": finish}

    def role_chunk(self, rid: str, index: int) -> dict:
        return self.chunk(rid, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}])


def assistant_message(output: ToolOutput) -> dict:
    """A whole chat answer's message when its text was read for tool calls."""
    message = {"role": "assistant", "content": output.content}
    if output.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in output.tool_calls]
    return message


def tool_chunks(shapes: ChatShapes, rid: str, delta: CompletionDelta, piece: Piece,
                state: ChoiceState, calls: ToolCallStream, plan: ToolPlan) -> list[dict]:
    """The chat chunks of one delta of a choice whose text is read for tool calls: content and
    tool-call deltas as `calls` releases them (the delta's logprobs ride on the first), and
    once the choice ends a last chunk with its finish reason."""
    released = calls.push(delta.text)
    if delta.finish_reason is not None:
        released += calls.finish()
    empty = Piece("", [], None)
    chunks = [shapes.chunk(rid, [shapes.chunk_choice(delta.index, piece if i == 0 else empty,
                                                     None, state, delta=d)])
              for i, d in enumerate(released)]
    if not released and piece.token_ids and shapes.top_logprobs is not None:
        chunks.append(shapes.chunk(rid, [shapes.chunk_choice(delta.index, piece, None, state,
                                                             delta={})]))
    if delta.finish_reason is not None:
        finish = plan.finish_reason(delta.finish_reason, calls.output())
        chunks.append(shapes.chunk(rid, [shapes.chunk_choice(delta.index, empty, finish, state,
                                                             delta={})]))
    return chunks
