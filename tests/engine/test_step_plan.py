"""The packed plan survives the trip to the device exactly."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dendrite_jax.engine import step_output
from dendrite_jax.engine.step_plan import StepPlan, StepShape, unpack


def test_pack_unpack_round_trip():
    shape = StepShape(num_decode=2, num_prefill=2, max_q_len=8, pages_per_seq=3)
    assert (shape.num_tokens, shape.num_seqs, shape.row_start(3)) == (18, 4, 10)
    plan = StepPlan.empty(shape)
    rng = np.random.default_rng(0)
    plan.input_ids[:] = rng.integers(0, 1000, 18)
    plan.q_lens[:] = [1, 1, 5, 0]
    plan.page_tables[:] = rng.integers(0, 50, (4, 3))
    plan.seed[:] = np.array([0, 1, 2**31 + 5, 2**32 - 1], np.uint32).view(np.int32)
    plan.temperature[:] = [0.0, 0.7, 1.3, 2.0]
    plan.top_p[:] = [1.0, 0.9, 0.5, 0.1]
    device = jax.jit(unpack, static_argnums=1)(plan.pack(), shape)
    np.testing.assert_array_equal(device.input_ids, plan.input_ids)
    np.testing.assert_array_equal(device.page_tables, plan.page_tables)
    np.testing.assert_array_equal(device.q_lens, plan.q_lens)
    np.testing.assert_array_equal(device.sampling.temperature, plan.temperature)
    np.testing.assert_array_equal(device.sampling.top_p, plan.top_p)
    np.testing.assert_array_equal(np.asarray(device.sampling.seed),
                                  [0, 1, 2**31 + 5, 2**32 - 1])


def test_step_outputs_unpack_as_packed():
    shape = StepShape(num_decode=2, num_prefill=1, max_q_len=16, pages_per_seq=4,
                      prompt_logprobs=True, needs_sort=True)
    rng = np.random.default_rng(1)
    fields = {}
    for name, field_shape, dtype in step_output.output_layout(shape):
        value = rng.normal(size=field_shape) if dtype == np.float32 else \
            rng.integers(-2**31, 2**31 - 1, field_shape)
        fields[name] = value.astype(dtype)
    packed = jax.jit(step_output.pack, static_argnums=0)(shape, fields)
    result = step_output.unpack(shape, np.asarray(packed))
    for name, value in fields.items():
        np.testing.assert_array_equal(getattr(result, name), value)
    plain = dataclasses.replace(shape, prompt_logprobs=False, needs_sort=False)
    assert [n for n, _, _ in step_output.output_layout(plain)] == ["tokens", "logprob"]
