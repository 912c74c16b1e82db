"""PlanBuilder lays rows out one after another on the flat token axis and fills declared fields."""

from __future__ import annotations

import numpy as np
import pytest

from dendrite_jax.engine.plan_builder import PlanBuilder, sampling_fields
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.step_plan import sampling_columns


def test_rows_follow_each_other_on_the_token_axis():
    builder = PlanBuilder(max_num_seqs=4, max_num_batched_tokens=64, pages_per_seq=6,
                          min_decode_rows=1)
    inputs = [[7], [1, 2, 3], [9], [4, 5]]  # decode rows and prefill chunks, any order
    shape = builder.shape([len(x) for x in inputs], needs_sort=True)
    assert (shape.num_tokens, shape.num_seqs, shape.decode_only) == (16, 4, False)
    tables = np.arange(4 * 3, dtype=np.int32).reshape(4, 3)
    params = [SamplingParams(temperature=0.5, top_p=0.9, seed=i) for i in range(4)]
    plan = builder.build(shape, inputs, tables, dict(
        seq_lens=[5, 3, 12, 8], slot_ids=[3, 0, 2, 1], sample=[1, 1, 1, 0],
        **sampling_fields([sampling_columns(p, i) for i, p in enumerate(params)])),
        targets=[[0], [2, 3, 0], [0], [5, 0]])
    np.testing.assert_array_equal(plan.input_ids[:7], [7, 1, 2, 3, 9, 4, 5])
    assert not plan.input_ids[7:].any()  # padding tokens
    np.testing.assert_array_equal(plan.targets[:7], [0, 2, 3, 0, 0, 5, 0])
    np.testing.assert_array_equal(plan.q_lens, [1, 3, 1, 2])
    np.testing.assert_array_equal(plan.row_starts(), [0, 1, 4, 5])
    np.testing.assert_array_equal(plan.page_tables[:, :3], tables)
    assert not plan.page_tables[:, 3:].any()
    np.testing.assert_allclose(plan.top_p, 0.9)
    np.testing.assert_array_equal(plan.seed, [0, 1, 2, 3])
    assert np.all(plan.repetition_penalty == 1.0)  # left out: the declared default
    decode = builder.shape([1, 1, 1])
    assert (decode.num_tokens, decode.num_seqs, decode.decode_only) == (4, 4, True)
    with pytest.raises(ValueError, match="not per-row plan fields"):
        builder.build(shape, inputs, tables, dict(input_ids=[1, 2, 3, 4]))
