"""Structured output in the engine: constraints attached to requests, the token masks a step
samples under, and the matchers advanced by what it sampled.

A constrained request runs one of two ways. Where its constraint compiles to a device
automaton (`grammar.device_automaton`) that fits the device's table, the step masks and
advances it itself: the row needs no host work per token. Otherwise an llguidance matcher on
the host fills the row's mask before each sampling step and consumes the sampled token after.
"""

from __future__ import annotations

import collections
import time
import weakref
from collections.abc import Callable

import numpy as np

from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.constraint_state import ConstraintState
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.runner import ModelRunner
from dendrite_jax.engine.scheduler import ScheduledBatch
from dendrite_jax.engine.step_plan import StepPlan
from dendrite_jax.grammar import GrammarCompiler, GrammarError
from dendrite_jax.grammar.automaton import AutomatonArena, AutomatonCursor
from dendrite_jax.grammar.device_automaton import FROM_SLOT, NO_AUTOMATON
from dendrite_jax.model.loader import LoadedModel


class StructuredOutput:
    """The engine's constraint machinery: the grammar compiler (built on first use), the
    device automata's table, and the host matchers' masks and parallel consume.

    `sync` is called before the device's automaton table is rewritten: no queued step may
    still read the table being replaced.
    """

    def __init__(self, model: LoadedModel, cfg: EngineConfig, runner: ModelRunner, *,
                 device_automata: bool, sync: Callable[[], None]) -> None:
        self.model = model
        self.cfg = cfg
        self.runner = runner
        self._sync = sync
        self.grammar: GrammarCompiler | None = None
        # Device automata: where each grammar sits in the device's table, the requests using
        # one, and why constraints kept their matchers.
        self.arena: AutomatonArena | None = None
        self._automaton_requests: weakref.WeakSet[Request] = weakref.WeakSet()
        self.automaton_reasons: collections.Counter[str] = collections.Counter()
        if device_automata and model.tokenizer is not None:
            vocabulary = self.compiler().vocabulary
            runner.enable_automata(cfg.automaton_states, vocabulary.token_bytes,
                                   vocabulary.end_tokens)
            self.arena = AutomatonArena(cfg.automaton_states)
        # (seconds, constrained rows) of each recent token-mask fill
        self.mask_fills: collections.deque[tuple[float, int]] = collections.deque(maxlen=10_000)

    def compiler(self) -> GrammarCompiler:
        """The model's grammar compiler, built on first use (building it is not free)."""
        if self.model.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer; this model has none")
        if self.grammar is None:
            self.grammar = GrammarCompiler(self.model.tokenizer, self.model.config.vocab_size)
        return self.grammar

    # ---------------------------------------------------------------------------- requests

    def attach(self, request: Request) -> None:
        """Give a constrained request a cursor in its device automaton, where the device can
        step its constraint, else its llguidance matcher. A constraint llguidance rejects
        fails that request alone (finish_reason "error", llguidance's message in `error`)."""
        try:
            if self.arena is None or not self._place_automaton(request):
                request.constraint = ConstraintState(
                    matcher=self.compiler().matcher(request.params))
        except GrammarError as e:
            request.fail(str(e))

    def _place_automaton(self, request: Request) -> bool:
        """Give the request a cursor in its constraint's device automaton where it has one
        that fits the table; False where not (the reason is counted in `automaton_reasons`)."""
        automaton = self.grammar.automaton(request.params)
        if isinstance(automaton, str):
            self.automaton_reasons[automaton] += 1
            return False
        placed = self.arena.place(automaton, self._automata_in_use)
        if placed is None:
            self.automaton_reasons[f"no room: {automaton.dfa.num_states} states and "
                                   f"automaton_states={self.cfg.automaton_states}"] += 1
            return False
        base, new = placed
        if new:
            self._sync()
            self.runner.write_automaton(base, automaton)
        request.constraint = ConstraintState(automaton=AutomatonCursor(automaton, base))
        self._automaton_requests.add(request)
        return True

    def _automata_in_use(self) -> set[str]:
        return {r.constraint.automaton.automaton.key for r in self._automaton_requests
                if not r.finished}

    def fast_forward(self, request: Request, max_model_len: int) -> None:
        """Append what the request's constraint forces, where `forced_tokens` allows it."""
        if self.cfg.forced_tokens and request.may_fast_forward:
            request.fast_forward(max_model_len)

    # ---------------------------------------------------------------------------- steps

    @staticmethod
    def pending(running: list[Request]) -> bool:
        """Whether a host-matched request has a token in flight: its next mask must wait."""
        return any(r.matched_on_host and r.num_pending for r in running)

    def automaton_states(self, requests: list[Request]) -> list[int] | None:
        """Each row's automaton state for the plan (None without device automata). A row whose
        input is still on device takes the state its slot's sample left."""
        if self.arena is None:
            return None
        return [NO_AUTOMATON if r.constraint is None or r.constraint.automaton is None else
                FROM_SLOT if r.num_pending else r.constraint.automaton.device_state
                for r in requests]

    def token_mask(self, batch: ScheduledBatch, plan: StepPlan) -> np.ndarray | None:
        """The step's token mask [S, words] if a host-matched row samples, else None (all
        allowed). Rows follow the plan's rows, so mixed batches cannot misalign."""
        rows = [(r.constraint.matcher, row) for row, (r, _) in enumerate(batch.rows)
                if r.matched_on_host and not r.finished and plan.sample[row]
                and not r.forced_at(int(plan.seq_lens[row]))]
        if not rows:
            return None
        start = time.perf_counter()
        mask = self.grammar.mask(plan.shape.num_seqs, rows)
        self.mask_fills.append((time.perf_counter() - start, len(rows)))
        return mask

    def consume(self, batch: ScheduledBatch, plan: StepPlan, tokens: list[int],
                sample: list[int]) -> dict[str, bool]:
        """Advance the matchers of a step's constrained rows by their sampled tokens all at
        once (llguidance's parallel consume: one by one, a large batch's matchers take much of
        the host's step). Returns request id -> accepted, for `Request.append_token`; rows it
        leaves out (stop tokens, forced positions, finished requests) append as before."""
        pairs, ids = [], []
        for row, (r, _) in enumerate(batch.rows):
            if (r.matched_on_host and sample[row] and not r.finished
                    and appends_sample(r, plan, row)
                    and tokens[row] not in r.stop_token_ids):  # a stop token is not consumed
                pairs.append((r.constraint.matcher, tokens[row]))
                ids.append(r.request_id)
        if len(pairs) < 2:
            return {}
        return dict(zip(ids, self.grammar.consume(pairs), strict=True))


def appends_sample(r: Request, plan: StepPlan, row: int) -> bool:
    """Whether the token a sampling row drew is appended to `r`: not where a forced token
    already sits (`forced_tokens`), whose draw is dropped."""
    return not r.forced_at(int(plan.seq_lens[row]))
