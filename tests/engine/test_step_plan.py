"""The packed plan survives the trip to the device exactly."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from dendrite_jax.engine import step_output
from dendrite_jax.engine.step_plan import StepPlan, StepShape, unpack


def test_pack_unpack_round_trip():
    shape = StepShape(num_tokens=18, num_seqs=4, pages_per_seq=3)
    plan = StepPlan.empty(shape)
    rng = np.random.default_rng(0)
    plan.input_ids[:] = rng.integers(0, 1000, 18)
    plan.q_lens[:] = [1, 1, 5, 0]
    np.testing.assert_array_equal(plan.row_starts(), [0, 1, 2, 7])
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
    shape = StepShape(num_tokens=16, num_seqs=3, pages_per_seq=4, prompt_logprobs=True,
                      needs_sort=True)
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


def test_every_field_is_declared_once_with_its_default():
    """Packing, unpacking, defaults and the requests' sampling columns all come from FIELDS."""
    from dendrite_jax.engine.sampling_params import SamplingParams
    from dendrite_jax.engine.step_plan import FIELDS, SAMPLING_FIELDS, buffer_size, sampling_columns

    shape = StepShape(num_tokens=8, num_seqs=2, pages_per_seq=5)
    plan = StepPlan.empty(shape)
    assert buffer_size(shape) == plan.pack().size == 2 * 8 + 2 * 5 + 2 * (len(FIELDS) - 3)
    for f in FIELDS:
        assert np.all(getattr(plan, f.name) == f.default), f.name
    params = SamplingParams(temperature=0.5, top_k=7, top_p=0.8, seed=3)
    columns = dict(zip([f.name for f in SAMPLING_FIELDS], sampling_columns(params, 2**32 - 1),
                       strict=True))
    assert columns["top_k"] == 7 and columns["top_p"] == 0.8 and columns["seed"] == -1
    device = jax.jit(unpack, static_argnums=1)(plan.pack(), shape)
    assert set(vars(device.sampling)) == {f.name for f in SAMPLING_FIELDS}
