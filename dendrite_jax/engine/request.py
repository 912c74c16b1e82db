"""Request: the host-side state of one sequence, from admission to its finished output."""

from __future__ import annotations

import enum
import time

import numpy as np

from dendrite_jax.engine.constraint_state import COMPLETE, ConstraintState
from dendrite_jax.engine.outputs import Logprob, PositionLogprobs, RequestOutput
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.step import FROM_LAST_TOKEN
from dendrite_jax.engine.step_plan import sampling_columns
from dendrite_jax.model.tokenizer import IncrementalDetokenizer, Tokenizer

# Placeholder for a sampled token whose step has been launched but not yet read back. As an
# input id it tells the step to read the slot's last sampled token on device.
PENDING = FROM_LAST_TOKEN


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its pages were taken and it will be recomputed
    DONE = "done"
    ABORTED = "aborted"


class Request:
    """Tokens, pages and outputs of one request.

    The request's sequence is `prompt_ids + output_ids`. `num_computed` counts leading tokens
    whose K/V are in its pages; the rest are fed in the next steps (a prefill computes many,
    a decode step the one last sampled token). A token is sampled whenever a step brings
    `num_computed` up to `num_tokens`. After preemption `num_computed` restarts at 0 and the
    whole sequence is recomputed.
    """

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, seed: int, max_len: int,
                 tokenizer: Tokenizer | None, stop_token_ids: tuple[int, ...],
                 ranked: bool = False) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        # Total tokens this request may reach: prompt + max_tokens, capped by the context.
        self.max_len = min(len(prompt_ids) + params.max_tokens, max_len)
        self.stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_token_ids.update(stop_token_ids)
        self.status = RequestStatus.WAITING
        self.pages: list[int] = []
        self.slot = -1
        self.num_computed = 0
        self.num_cached_pages = 0  # leading pages already committed to the prefix cache
        self.new_in_slot = False  # its next row must clear the slot's device-side state
        self.num_preemptions = 0
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.tokenizer = tokenizer
        self.detokenizer = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
                            if tokenizer else None)
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        # A constrained request's handle into structured output (`StructuredOutput.attach`).
        self.constraint: ConstraintState | None = None
        self.donor: Request | None = None  # parallel sampling: the sibling computing the prompt
        self.ranked = ranked  # one of best_of completions, ranked by cumulative logprob
        self.cumulative_logprob = 0.0  # raw-model logprobs of the generated tokens, summed
        self.error: str | None = None
        self.arrival = time.perf_counter()
        self.first_scheduled_time: float | None = None  # first admitted to running (queue time)
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        # This request's values of every StepPlan's sampling fields (fixed for its life).
        self.sampling_columns = sampling_columns(params, seed)

    # ----------------------------------------------------------------------------- state

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def resolved_output_ids(self) -> list[int]:
        """Generated tokens read back so far (pending placeholders excluded)."""
        return self.output_ids[:len(self.output_ids) - self.num_pending]

    @property
    def num_pending(self) -> int:
        """Sampled tokens not read back yet: the placeholders ending `output_ids` (up to two
        launches in flight, each of one step or a burst)."""
        n = 0
        for t in reversed(self.output_ids):
            if t != PENDING:
                break
            n += 1
        return n

    @property
    def exhausted(self) -> bool:
        """All tokens it may generate are sampled (some perhaps still pending)."""
        return len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_len

    def add_pending(self, steps: int = 1) -> None:
        self.output_ids.extend([PENDING] * steps)

    def can_burst(self, steps: int) -> bool:
        """Whether its next `steps` tokens may be sampled in one launch: decoding, without a
        host matcher (whose mask needs each token first; a device automaton steps on the
        device), without the logit sort (bursts are compiled without it), with that many
        tokens left."""
        return (not self.matched_on_host and self.num_uncomputed == 1
                and not self.params.needs_sort and self.num_tokens + steps <= self.max_len)

    @property
    def matched_on_host(self) -> bool:
        """Whether a host matcher constrains it (its mask needs each token before the next)."""
        return self.constraint is not None and self.constraint.on_host

    def forced_at(self, position: int) -> bool:
        """Whether a forced token fills `position`, whose launched sample is then dropped."""
        return self.constraint is not None and position in self.constraint.forced_positions

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status in (RequestStatus.DONE, RequestStatus.ABORTED)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    # ----------------------------------------------------------------------------- outputs

    def _decoded(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _position_logprobs(self, chosen: int, logprob: float, rank: int, top_lp: np.ndarray,
                           top_ids: np.ndarray, n: int) -> PositionLogprobs:
        entry = {int(t): Logprob(float(lp), i + 1, self._decoded(int(t)))
                 for i, (t, lp) in enumerate(zip(top_ids[:n], top_lp[:n], strict=True))}
        entry.setdefault(chosen, Logprob(float(logprob), int(rank), self._decoded(chosen)))
        return entry

    def add_prompt_logprobs(self, position: int, logprob: float, rank: int, top_lp: np.ndarray,
                            top_ids: np.ndarray) -> None:
        """Record the logprob of prompt token `position` (from the logits of position - 1).
        Positions already recorded (a recomputation after preemption) are skipped."""
        if position != len(self.prompt_logprobs) or position >= len(self.prompt_ids):
            return
        self.prompt_logprobs.append(self._position_logprobs(
            self.prompt_ids[position], logprob, rank, top_lp, top_ids,
            self.params.prompt_logprobs))

    def append_token(self, token: int, max_model_len: int, logprob: float = 0.0, rank: int = 0,
                     top_lp: np.ndarray | None = None, top_ids: np.ndarray | None = None, *,
                     accepted: bool | None = None) -> None:
        """Add a sampled token (filling the oldest pending placeholder if there is one), then
        decide whether the request is finished. `logprob` (the token's raw-model logprob) adds
        to the cumulative logprob; the rest matter only when the request asked for logprobs.
        `accepted`: the matcher has already consumed this (non-stop) token, with this result
        (the engine advances a step's matchers in parallel)."""
        self.last_token_time = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time
        # Placeholders end the list, oldest first: the token fills the oldest.
        ids = self.output_ids
        pending = self.num_pending
        index = len(ids) - pending
        if pending:
            ids[index] = token
        else:
            ids.append(token)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(self._position_logprobs(token, logprob, rank, top_lp, top_ids,
                                                         self.params.logprobs))
        previous_len = len(self.text)
        if self.detokenizer is not None:
            self.text += self.detokenizer.push(token)
        num_outputs = index + 1
        if token in self.stop_token_ids:
            self._finish("stop", token)
        elif self.constraint is not None and (
                ending := self.constraint.advance(token, accepted)) is not None:
            if ending == COMPLETE:
                self._finish("stop", None)  # the constraint is complete: nothing can follow
            else:
                self.fail(ending)
        elif self._check_stop_strings(previous_len):
            pass
        elif (num_outputs >= self.params.max_tokens
              or len(self.prompt_ids) + num_outputs >= max_model_len):
            self._finish("length", None)
        if self.finished:
            del ids[num_outputs:]  # placeholders of steps still in flight are dropped

    @property
    def may_fast_forward(self) -> bool:
        """Whether forced tokens may skip sampling: constrained, and nothing reported per token
        or ranked by logprob (logprobs requested, best_of) would miss their logprobs."""
        return self.matched_on_host and self.logprobs is None and not self.ranked

    def fast_forward(self, max_model_len: int) -> int:
        """Append the tokens the constraint now forces (`grammar.forced_token`; never a stop
        token), each as if sampled, until it allows a choice or the request finishes; they
        fill pending placeholders first, whose launched samples are then discarded
        (`forced_positions`). Returns how many were appended."""
        pending, count = self.num_pending, 0
        first_pending = self.num_tokens - pending
        while self.matched_on_host and not self.finished:
            token = self.constraint.forced_token()
            if token is None or token in self.stop_token_ids:
                break
            self.append_token(token, max_model_len)
            count += 1
        if self.constraint is not None:
            self.constraint.forced_positions.update(
                range(first_pending, first_pending + min(pending, count)))
        return count

    def _check_stop_strings(self, previous_len: int) -> bool:
        for stop in self.params.stop:
            start = max(0, previous_len - len(stop) + 1)
            index = self.text.find(stop, start)
            if index >= 0:
                end = index + len(stop) if self.params.include_stop_str_in_output else index
                self.text = self.text[:end]
                self._finish("stop", stop)
                return True
        return False

    def fail(self, message: str) -> None:
        """End the request with an error (a constraint that does not compile, or breaks)."""
        self.error = message
        self.finish_reason = "error"
        self.status = RequestStatus.DONE

    def abort(self) -> None:
        self.finish_reason = "abort"
        self.status = RequestStatus.ABORTED

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        # A stop string already cut the text; otherwise emit any held-back tail.
        if self.detokenizer is not None and not isinstance(stop_reason, str):
            self.text += self.detokenizer.flush()
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.status = RequestStatus.DONE

    def output(self) -> RequestOutput:
        ttft = None if self.first_token_time is None else self.first_token_time - self.arrival
        decode_time = (None if self.first_token_time is None
                       else self.last_token_time - self.first_token_time)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_ids,
            text=self.text, token_ids=self.resolved_output_ids, finish_reason=self.finish_reason,
            stop_reason=self.stop_reason, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, time_to_first_token=ttft,
            decode_time=decode_time, error=self.error,
            cumulative_logprob=self.cumulative_logprob)
