"""Streaming: what a request has produced since its last delta, for every front end that streams
(`LLM.stream`, `AsyncEngine`).

A delta carries the tokens read back since the last one, their logprobs, and their text less a
tail that a stop string could still cut (the stop is found only once its last token arrives, and
the text is then cut before it): so the deltas of a request, joined, are its final output. Its
last delta carries the finish reason and the whole output.
"""

from __future__ import annotations

import dataclasses

from dendrite_jax.engine.outputs import PositionLogprobs, RequestOutput
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.groups import RequestGroup


@dataclasses.dataclass(frozen=True)
class CompletionDelta:
    """What one request produced since the last delta (streaming)."""

    request_id: str
    text: str  # new text, never ending inside a UTF-8 character
    token_ids: list[int]  # new tokens
    finish_reason: str | None  # set on a request's last delta
    output: RequestOutput | None = None  # the full output, on the last delta
    index: int = 0  # which of its prompt's n completions (SamplingParams.n)
    logprobs: list[PositionLogprobs] | None = None  # the new tokens', if the request asked
    # the prompt's (first entry None), on a request's first delta, if the request asked
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclasses.dataclass
class StreamPosition:
    """How much of one request's output its deltas have carried so far."""

    tokens: int = 0
    text: int = 0  # characters
    logprobs: int = 0
    finished: bool = False  # its last delta is out


def held_back(params: SamplingParams) -> int:
    """Characters of a running request's text not yet streamed: a stop string found later may
    start that far back, and the text is cut before it (kept whole with
    `include_stop_str_in_output`, which never cuts streamed text)."""
    if params.include_stop_str_in_output or not params.stop:
        return 0
    return max(len(s) for s in params.stop) - 1


def next_delta(request: Request, position: StreamPosition, index: int = 0
               ) -> CompletionDelta | None:
    """`request`'s output since `position`, which it advances; None while it has no new token
    and has not finished, and after its last delta."""
    if position.finished:
        return None
    tokens = request.resolved_output_ids
    finished = request.finished
    if len(tokens) == position.tokens and not finished:
        return None
    text_end = len(request.text)
    if not finished:
        text_end = max(position.text, text_end - held_back(request.params))
    first = position.tokens == 0 and position.text == 0 and position.logprobs == 0
    logprobs = None
    if request.logprobs is not None:
        logprobs = request.logprobs[position.logprobs:]
        position.logprobs = len(request.logprobs)
    delta = CompletionDelta(request.request_id, request.text[position.text:text_end],
                            tokens[position.tokens:], request.finish_reason if finished else None,
                            request.output() if finished else None, index, logprobs,
                            request.prompt_logprobs if first else None)
    position.tokens, position.text, position.finished = len(tokens), text_end, finished
    return delta


class GroupStream:
    """The deltas of one request group, each tagged with its completion's index.

    Completions stream as they are generated (index i: the group's i-th request). A group of
    `best_of` > n candidates cannot be ranked before they all end: it yields nothing until
    then, and then its n best whole (index i: the i-th best).
    """

    def __init__(self, group: RequestGroup) -> None:
        self.group = group
        self.ranked_at_end = group.params.num_sequences > group.params.n
        self._positions = {r.request_id: (i, StreamPosition())
                           for i, r in enumerate(group.requests)}
        self._open = set(range(group.params.n))  # completions without their last delta

    @property
    def finished(self) -> bool:
        """Every completion's last delta is out."""
        return not self._open

    def advance(self, request: Request) -> list[CompletionDelta]:
        """What the group has to stream now that `request`, one of its own, has changed."""
        if self.ranked_at_end:
            if not self._open or not self.group.finished:
                return []
            self._open.clear()
            return [next_delta(r, StreamPosition(), i)
                    for i, r in enumerate(self.group.completions())]
        index, position = self._positions[request.request_id]
        delta = next_delta(request, position, index)
        if delta is None:
            return []
        if delta.finish_reason is not None:
            self._open.discard(index)
        return [delta]

    def close(self, finish_reason: str) -> list[CompletionDelta]:
        """Last deltas, without output, for the completions still open: the group ends without
        its requests finishing (the engine stopped)."""
        requests = self.group.requests
        deltas = [CompletionDelta(self.group.request_id if self.ranked_at_end
                                  else requests[i].request_id, "", [], finish_reason, None, i)
                  for i in sorted(self._open)]
        self._open.clear()
        return deltas
