"""Model-free stand-ins for the front-end tests: real `Request`s over a tokenizer whose tokens are
given strings, made by an engine that validates nothing and queues nothing."""

from __future__ import annotations

import dataclasses

import numpy as np

from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams

MAX_LEN = 10_000
NO_TOP = np.zeros(0)


class PieceTokenizer:
    """Token i decodes to `pieces[i]`; a sequence to their concatenation."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)

    def encode(self, text: str) -> list[int]:
        return [len(text)]


@dataclasses.dataclass
class FakeModel:
    tokenizer: PieceTokenizer | None
    source: str = "fake-model"


class FakeEngine:
    """`make_request` and `add`, as the front ends call them; a prompt of `bad_prompt` is
    refused as the engine refuses a bad request."""

    def __init__(self, tokenizer: PieceTokenizer | None = None,
                 bad_prompt: list[int] | None = None) -> None:
        self.model = FakeModel(tokenizer)
        self.bad_prompt = bad_prompt
        self.added: list[Request] = []
        self.next_id = 0

    def make_request(self, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                     ranked: bool = False) -> Request:
        if prompt_ids == self.bad_prompt:
            raise ValueError("bad prompt")
        self.next_id += 1
        seed = 12345 if params.seed is None else params.seed
        return Request(str(self.next_id), prompt, list(prompt_ids), params, seed % 2**32,
                       MAX_LEN, self.model.tokenizer, (), ranked=ranked)

    def add(self, request: Request) -> None:
        self.added.append(request)


def generate(request: Request, tokens: list[int], logprobs: list[float] | None = None) -> None:
    """Append `tokens` (with these logprobs) as the engine would, until it finishes."""
    for i, token in enumerate(tokens):
        if request.finished:
            return
        request.append_token(token, MAX_LEN, logprobs[i] if logprobs else 0.0, 1, NO_TOP, NO_TOP)
