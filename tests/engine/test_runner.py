"""The runner: caches are donated to the step, and each bucket compiles once."""

from __future__ import annotations

import numpy as np

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


def test_bucket_shapes_are_powers_of_two():
    from dendrite_jax.engine.buckets import all_shapes, decode_rows_floor

    shape = bucket_shape(3, [5, 13], 3, max_pages_per_seq=64, prompt_logprobs=False)
    dims = lambda s: (s.num_decode, s.num_prefill, s.max_q_len, s.pages_per_seq)  # noqa: E731
    assert dims(shape) == (4, 2, 16, 4)
    decode = bucket_shape(5, [], 9, max_pages_per_seq=64, prompt_logprobs=False)
    assert dims(decode) == (8, 0, 1, 16)
    assert decode.num_tokens == 8
    # On a GPU one decode row still makes a two-row step: XLA's GPU compiler turns a one-row
    # projection into multiply + reduce (buckets.decode_rows_floor).
    single = bucket_shape(1, [], 1, max_pages_per_seq=64, prompt_logprobs=False,
                          min_decode_rows=decode_rows_floor("gpu"))
    assert dims(single) == (2, 0, 1, 4)
    assert decode_rows_floor("cpu") == 1
    assert decode_rows_floor("gpu", fp8_kernel=True) == 1  # the FP8 kernel's one-row path
    assert single in all_shapes(max_num_seqs=1, max_num_batched_tokens=16, max_pages_per_seq=4,
                                min_decode_rows=2)


def test_full_width_page_tables_for_kernels():
    """Kernels read only each row's pages: one page-table width serves every step."""
    from dendrite_jax.engine.buckets import all_shapes

    wide = bucket_shape(5, [], 9, max_pages_per_seq=40, prompt_logprobs=False,
                        bucket_pages=False)
    assert wide.pages_per_seq == 64
    kwargs = dict(max_num_seqs=8, max_num_batched_tokens=512, max_pages_per_seq=40)
    fixed = all_shapes(**kwargs, bucket_pages=False)
    assert {s.pages_per_seq for s in fixed} == {64}
    assert len(all_shapes(**kwargs)) == 5 * len(fixed)  # page buckets 4, 8, 16, 32, 64
    # A context limit under MIN_PAGES pages still lands on a warmed-up bucket.
    tiny = bucket_shape(1, [], 1, max_pages_per_seq=2, prompt_logprobs=False)
    assert tiny in all_shapes(max_num_seqs=1, max_num_batched_tokens=16, max_pages_per_seq=2)
