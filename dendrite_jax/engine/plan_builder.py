"""PlanBuilder: the one place step plans are made, for the engine's steps and beam search.

It picks a step's shape from its rows (`buckets.bucket_shape`) and fills the plan's declared
fields (`step_plan.FIELDS`) column by column: one numpy write per field, not per row (at 64
rows a per-row fill cost as much host time as a GPU step).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from dendrite_jax.engine.buckets import bucket_shape
from dendrite_jax.engine.step_plan import FIELDS, SAMPLING_FIELDS, StepPlan, StepShape

# Per-row fields a caller supplies (q_lens comes from the inputs, page tables separately).
_ROW_FIELDS = frozenset(f.name for f in FIELDS if f.extent == "row") - {"q_lens"}


class PlanBuilder:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, pages_per_seq: int,
                 min_decode_rows: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pages_per_seq = pages_per_seq
        self.min_decode_rows = min_decode_rows

    def shape(self, q_lens: Sequence[int], *, prompt_logprobs: bool = False,
              needs_sort: bool = False, burst: int = 1) -> StepShape:
        """The shape of a step whose rows compute `q_lens` tokens each."""
        return bucket_shape(sum(q_lens), len(q_lens), decode_only=all(n == 1 for n in q_lens),
                            max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            pages_per_seq=self.pages_per_seq, prompt_logprobs=prompt_logprobs,
                            needs_sort=needs_sort, min_decode_rows=self.min_decode_rows,
                            burst=burst)

    def build(self, shape: StepShape, inputs: Sequence[Sequence[int]],
              page_tables: np.ndarray, columns: dict[str, Sequence],
              targets: Sequence[Sequence[int]] | None = None) -> StepPlan:
        """A plan of `shape` whose row i computes the tokens `inputs[i]` (laid out one row
        after another on the flat axis), reads pages `page_tables[i]` and takes its other
        per-row fields from `columns` (field name -> one value per row; fields left out keep
        their declared defaults). `targets`: each input token's next prompt token, for prompt
        logprobs."""
        unknown = set(columns) - _ROW_FIELDS
        if unknown:
            raise ValueError(f"not per-row plan fields: {sorted(unknown)}")
        rows = len(inputs)
        plan = StepPlan.empty(shape)
        flat = list(itertools.chain.from_iterable(inputs))
        plan.input_ids[:len(flat)] = flat
        if targets is not None:
            plan.targets[:len(flat)] = list(itertools.chain.from_iterable(targets))
        plan.page_tables[:rows, :page_tables.shape[1]] = page_tables
        plan.fill_rows(rows, {"q_lens": [len(x) for x in inputs], **columns})
        return plan


def sampling_fields(columns: Sequence[tuple]) -> dict[str, np.ndarray]:
    """Requests' `sampling_columns` (one tuple a row) as plan columns."""
    values = np.array(columns, np.float64).reshape(len(columns), len(SAMPLING_FIELDS)).T
    return {f.name: values[j].astype(f.dtype) for j, f in enumerate(SAMPLING_FIELDS)}
