"""Step planner: which compiled shape a scheduled batch runs as, and the host arrays it feeds.

The shape set is fixed by the engine's limits (`buckets`); every batch maps to one of them,
so warm-up can compile them all. The plan's per-row columns come from the requests
(`Request.sampling_columns`, `plan_builder.FIELDS`) and the slots' page tables.
"""

from __future__ import annotations

import math

from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.buckets import all_shapes
from dendrite_jax.engine.logit_bias import LogitBiasTable
from dendrite_jax.engine.page_table import HostPageTable
from dendrite_jax.engine.plan_builder import PlanBuilder, sampling_fields
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.scheduler import ScheduledBatch
from dendrite_jax.engine.step_plan import StepPlan, StepShape


class StepPlanner:
    def __init__(self, cfg: EngineConfig, max_model_len: int, *, min_decode_rows: int,
                 burst: int, logit_bias: LogitBiasTable) -> None:
        self.cfg = cfg
        self.logit_bias = logit_bias
        self.burst = burst
        # Every step's page tables have this full width: every backend reads only the pages
        # each row's context holds.
        self.max_pages_per_seq = math.ceil(max_model_len / cfg.page_size)
        self.min_decode_rows = min_decode_rows
        self.page_table = HostPageTable(cfg.max_num_seqs, self.max_pages_per_seq)
        self.builder = PlanBuilder(max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   pages_per_seq=self.max_pages_per_seq,
                                   min_decode_rows=min_decode_rows)

    def step_shapes(self) -> list[StepShape]:
        """Every step shape the scheduler can produce."""
        return all_shapes(max_num_seqs=self.cfg.max_num_seqs,
                          max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                          pages_per_seq=self.max_pages_per_seq,
                          min_decode_rows=self.min_decode_rows, burst=self.burst)

    def shapes_for(self, prompt_len: int, params: SamplingParams) -> list[StepShape]:
        """The shapes one request alone on the engine runs through: its prompt's chunks, then
        its decode steps (and bursts). A one-shot run compiles just these, in parallel."""
        budget = self.cfg.max_num_batched_tokens
        sort, prompt_lp = params.needs_sort, params.prompt_logprobs is not None
        shapes = {self.builder.shape([n], prompt_logprobs=prompt_lp, needs_sort=sort)
                  for n in {min(budget, prompt_len), prompt_len % budget or budget}}
        shapes.add(self.builder.shape([1], needs_sort=sort))
        if self.burst > 1 and not sort and not params.constrained:
            shapes.add(self.builder.shape([1], burst=self.burst))
        return sorted(shapes)

    def build(self, batch: ScheduledBatch, automaton_states: list[int] | None) -> StepPlan:
        """The step's host arrays (`PlanBuilder`). Row i is the batch's i-th row; a pending
        token (launched, not read back) is PENDING == FROM_LAST_TOKEN: the device reads it
        from the slot's last-token buffer. `automaton_states`: each row's device automaton
        state, where device automata are on."""
        reqs = [r for r, _ in batch.rows]
        q_lens = [n for _, n in batch.rows]
        wants_prompt_lp = any(r.prompt_logprobs is not None and r.num_computed < len(r.prompt_ids)
                              for r in reqs)
        shape = self.builder.shape(q_lens, prompt_logprobs=wants_prompt_lp,
                                   needs_sort=any(r.params.needs_sort for r in reqs),
                                   burst=batch.steps)
        inputs = [r.tokens[r.num_computed:r.num_computed + n] if n > 1
                  else [r.token_at(r.num_computed)] for r, n in batch.rows]
        targets = None
        if wants_prompt_lp:
            targets = [[r.prompt_ids[p + 1] if p + 1 < len(r.prompt_ids) else 0
                        for p in range(r.num_computed, r.num_computed + n)]
                       for r, n in batch.rows]
        slots = [r.slot for r in reqs]
        for r in reqs:
            self.page_table.sync(r)
        seq_lens = [r.num_computed + n for r, n in batch.rows]
        columns = dict(seq_lens=seq_lens, slot_ids=slots,
                       prompt_lens=[len(r.prompt_ids) for r in reqs],
                       sample=[s == r.num_tokens for s, r in zip(seq_lens, reqs, strict=True)],
                       reset=[r.new_in_slot for r in reqs],
                       **sampling_fields([r.sampling_columns for r in reqs]))
        if automaton_states is not None:
            columns["automaton_state"] = automaton_states
        for r in reqs:
            if r.new_in_slot:
                self.logit_bias.assign(r.slot, r.params.logit_bias)
            r.new_in_slot = False
        plan = self.builder.build(shape, inputs, self.page_table.rows(slots, shape.pages_per_seq),
                                  columns, targets)
        plan.logit_bias = self.logit_bias.device()
        return plan
