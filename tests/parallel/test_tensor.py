"""Tensor and data parallelism on CPU with forced host devices (a subprocess: the device count
is fixed when JAX starts): the same greedy tokens and prompt log-probabilities as one device, for
SmolLM2 split 3 ways (its 9 query and 3 KV heads) and a small random model split 2, 4 and 8
ways (its output matrix split on the vocabulary), and the same tokens from 4 data-parallel
replicas of a 2-way split; the caches really are spread over the devices; bad sizes are
refused."""

from __future__ import annotations

import numpy as np
import pytest

from dendrite_jax import LLM
from tests.parallel.workers import run_worker


def check_same(report: dict) -> None:
    base = report["1"]
    for size, got in report.items():
        dp, _, tp = size.partition("x")
        assert got["devices"] == int(dp) * int(tp or 1), size
        assert got["tokens"] == base["tokens"], size
        assert got.get("slots_replicated", True), size
        if "prompt_logprobs" not in got:
            continue
        for a, b in zip(got["prompt_logprobs"], base["prompt_logprobs"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_smollm2_three_ways():
    """Scanned layers: a third of the unrolled model's compile time (which the slow run
    checks below)."""
    check_same(run_worker("smollm2-135m", "1,3", layer_loop="scan"))


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_smollm2_three_ways_unrolled():
    check_same(run_worker("smollm2-135m", "1,3"))


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_random_model_two_four_eight_ways(random_preset):
    report = run_worker(random_preset, "1,2,4,8", "4x2")
    check_same(report)
    for tp in (1, 2, 4, 8):  # each device holds its share of the output matrix's vocabulary
        assert report[str(tp)]["lm_head_columns"] == 512 // tp
    assert len({t for row in report["1"]["tokens"] for t in row}) > 3  # not a constant output


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_kernel_backend_under_shard_map(random_preset):
    """The GPU kernel (interpret mode here) as each device's attention: Pallas outputs carry no
    varying-axis type, which shard_map must not check."""
    check_same(run_worker(random_preset, "1,2", backend="pallas_gpu"))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="devices"):
        LLM(model="tiny-random", tensor_parallel_size=64, compilation_cache=False)
    with pytest.raises(ValueError, match="does not combine"):
        LLM(model="tiny-random", tensor_parallel_size=2, weights_dtype="fp8",
            compilation_cache=False)
