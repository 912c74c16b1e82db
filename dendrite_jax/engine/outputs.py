"""What generate returns: RequestOutput and Logprob (vLLM-shaped)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# One generated (or prompt) position: token id -> Logprob, the chosen token always included.
PositionLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error", or None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first entry None
    time_to_first_token: float | None = None  # seconds from submission
    decode_time: float | None = None  # seconds from the first generated token to the last
    error: str | None = None  # why the request failed (finish_reason "error")
    cumulative_logprob: float = 0.0  # summed raw-model logprobs of the generated tokens
    # SamplingParams(n > 1): every returned completion (this output is the first of them)
    samples: list[RequestOutput] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
