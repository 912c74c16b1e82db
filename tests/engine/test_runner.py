"""The runner: caches are donated to the step, and each bucket compiles once."""

from __future__ import annotations

import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.buckets import bucket_shape


def test_kv_cache_and_penalty_state_are_donated():
    llm = LLM(model="tiny-random", num_pages=32, compilation_cache=False)
    runner = llm.engine.runner
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))
    old_k, old_counts = runner.kv.k, runner.slots.output_counts
    llm.generate([[4, 5, 6]], SamplingParams(max_tokens=2, temperature=0))
    assert old_k.is_deleted() and old_counts.is_deleted()  # updated in place, not copied
    assert np.any(np.asarray(runner.kv.k) != 0)  # K/V were written into pages


def test_each_bucket_compiles_once():
    llm = LLM(model="tiny-random", num_pages=64, max_num_seqs=4, compilation_cache=False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm.generate([[1, 2, 3], [7, 8]], params)
    first = llm.compilations
    assert first >= 2  # a prefill bucket and a decode bucket
    llm.generate([[9, 10, 11], [12, 13, 14, 15]], params)  # same buckets, different values
    assert llm.compilations == first


def test_bucket_shapes_follow_the_token_ladder():
    from dendrite_jax.engine.buckets import all_shapes, decode_rows_floor

    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=512, pages_per_seq=64)
    mixed = bucket_shape(3 + 5 + 13, 5, decode_only=False, **kwargs)
    assert (mixed.num_tokens, mixed.num_seqs, mixed.decode_only) == (32, 8, False)
    assert bucket_shape(3, 2, decode_only=False, **kwargs).num_tokens == 16  # MIN_MIXED_TOKENS
    decode = bucket_shape(5, 5, decode_only=True, **kwargs)
    assert (decode.num_tokens, decode.num_seqs, decode.decode_only) == (8, 8, True)
    assert decode.pages_per_seq == 64  # always the full width
    # On a GPU one decode row still makes a two-row step: XLA's GPU compiler turns a one-row
    # projection into multiply + reduce (buckets.decode_rows_floor).
    single = bucket_shape(1, 1, decode_only=True, min_decode_rows=decode_rows_floor("gpu"),
                          **kwargs)
    assert (single.num_tokens, single.num_seqs) == (2, 2)
    assert decode_rows_floor("cpu") == 1
    assert decode_rows_floor("gpu", fp8_kernel=True) == 1  # the FP8 kernel's one-row path
    lp = bucket_shape(40, 2, decode_only=False, prompt_logprobs=True, **kwargs)
    assert (lp.num_tokens, lp.needs_sort) == (64, True)  # the sparser prompt-logprob ladder
    shapes = all_shapes(**kwargs)
    assert {mixed, decode, lp} <= set(shapes)
    assert single in all_shapes(**kwargs, min_decode_rows=2)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        bucket_shape(600, 2, decode_only=False, **kwargs)


def test_few_shapes_cover_every_step():
    """The token ladder times a few variants: tens of programs, not hundreds."""
    from dendrite_jax.engine.buckets import all_shapes

    cpu = all_shapes(max_num_seqs=8, max_num_batched_tokens=512, pages_per_seq=512)
    # decode-only 1, 2, 4, 8 x sort; mixed 16 .. 512 x sort; prompt logprobs at 16, 64, 512
    assert len(cpu) == 4 * 2 + 6 * 2 + 3
    serving = all_shapes(max_num_seqs=64, max_num_batched_tokens=2048, pages_per_seq=8192,
                         min_decode_rows=2, burst=4)
    assert len(serving) <= 40
    # decode-only 2 .. 64 x (sort, no sort, burst); mixed 16 .. 2048 x sort; prompt logprobs
    # at 16, 32, 256, 2048
    assert len(serving) == 6 * 3 + 8 * 2 + 4
    assert {s.pages_per_seq for s in serving} == {8192}


def test_no_program_cache_on_a_cpu(tmp_path):
    """XLA:CPU executables did not survive serialization across processes: the CPU keeps JAX's
    persistent cache only."""
    import jax

    from dendrite_jax.engine.program_cache import default_program_cache

    configured = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))  # where one would be made
    try:
        assert jax.default_backend() == "cpu" and default_program_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", configured)
    assert not (tmp_path / "dendrite_programs").exists()
