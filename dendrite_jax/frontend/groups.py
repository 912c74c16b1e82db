"""Request groups: the engine requests of one prompt, and the one output they make.

A prompt whose SamplingParams ask for `n` completions, or `best_of` candidates, runs as that
many sibling requests: the first computes the prompt, the others take its pages (`Request.donor`)
and sample with seed + i. The group's output is its first completion, with all `n` of them in
`samples`; `best_of` candidates are ranked by cumulative logprob first. Every front end (`LLM`,
`DataParallelLLM`, `AsyncEngine`) builds and reads groups here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dendrite_jax.engine.engine import Engine
from dendrite_jax.engine.outputs import RequestOutput
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.prompts import Prompt, prompt_token_ids


@dataclasses.dataclass(frozen=True)
class RequestGroup:
    """The requests of one prompt: one, or the `n`/`best_of` siblings of `params`."""

    params: SamplingParams
    requests: list[Request]

    @property
    def request_id(self) -> str:
        """The group's id: its first request's (the one request's, without n/best_of)."""
        return self.requests[0].request_id

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.requests)

    @property
    def num_generated(self) -> int:
        """Tokens its requests have generated so far (read back from the device)."""
        return sum(len(r.resolved_output_ids) for r in self.requests)

    def completions(self) -> list[Request]:
        """The `n` requests it returns, in order: the best by cumulative logprob first where
        `best_of` is set (ranked only once all have finished)."""
        requests = list(self.requests)
        if self.params.best_of:
            requests.sort(key=lambda r: -r.cumulative_logprob)
        return requests[:self.params.n]

    def output(self) -> RequestOutput:
        """Its prompt's output: its request's, or for n/best_of the first of its completions
        with all of them in `samples`."""
        if len(self.requests) == 1:
            return self.requests[0].output()
        outputs = [r.output() for r in self.completions()]
        return dataclasses.replace(outputs[0], samples=outputs)


def make_group(engine: Engine, prompt: str | None, prompt_ids: list[int],
               params: SamplingParams) -> RequestGroup:
    """One prompt's requests, validated by the engine (ValueError naming the problem) but not
    queued. Siblings sample with seed + i and take the first request's prompt pages."""
    count = params.num_sequences
    requests = []
    for i in range(count):
        child = params if count == 1 else dataclasses.replace(
            params, n=1, best_of=None, seed=None if params.seed is None else params.seed + i)
        requests.append(engine.make_request(prompt, prompt_ids, child,
                                            ranked=bool(params.best_of)))
    for r in requests[1:]:
        r.donor = requests[0]
        if r.prompt_logprobs is not None:  # one prompt, scored once: by the donor
            r.prompt_logprobs = requests[0].prompt_logprobs
    return RequestGroup(params, requests)


def start_groups(engine: Engine, prompts: Sequence[Prompt],
                 params_list: Sequence[SamplingParams]) -> list[RequestGroup]:
    """Each prompt's group, all validated before any is queued, then all queued on `engine`.
    Text prompts are tokenised with the engine's model's tokenizer."""
    groups = []
    for prompt, params in zip(prompts, params_list, strict=True):
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        groups.append(make_group(engine, text, prompt_token_ids(engine.model, prompt), params))
    for group in groups:
        for r in group.requests:
            engine.add(r)
    return groups


def group_requests(groups: Sequence[RequestGroup]) -> list[Request]:
    """Every request of the groups, in order."""
    return [r for group in groups for r in group.requests]
