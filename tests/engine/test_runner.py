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
    assert {s.pages_per_seq for s in serving} == {8192}


def test_program_cache_loads_what_an_earlier_engine_compiled(tmp_path):
    """A second engine loads its programs from disk (no tracing) and runs them as compiled;
    another setting is another key, and an unreadable entry is compiled again."""
    from dendrite_jax.engine.program_cache import ProgramCache

    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outputs = []
    for _ in range(2):
        llm = LLM(model="tiny-random", num_pages=32, max_num_seqs=2, compilation_cache=False,
                  warmup=False)
        llm.engine.runner.programs = ProgramCache(tmp_path)
        outputs.append([o.token_ids for o in llm.generate([[1, 2, 3], [4, 5]], params)])
    runner = llm.engine.runner
    assert runner.loaded_programs == runner.compilations >= 2 and outputs[0] == outputs[1]
    files = sorted(tmp_path.glob("*.program"))
    assert len(files) == runner.compilations
    for f in files:
        f.write_bytes(b"not a program")
    other = LLM(model="tiny-random", num_pages=32, max_num_seqs=4, compilation_cache=False,
                warmup=False)
    other.engine.runner.programs = ProgramCache(tmp_path)
    llm.engine.runner.programs = ProgramCache(tmp_path)
    llm.engine.runner._compiled.clear()
    again = [o.token_ids for o in llm.generate([[1, 2, 3], [4, 5]], params)]
    assert again == outputs[0] and llm.engine.runner.loaded_programs == runner.compilations
    other.generate([[1, 2, 3]], params)
    assert other.engine.runner.loaded_programs == 0  # max_num_seqs=4: other shapes, other keys


PROGRAM_CACHE_RUN = """
import sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.program_cache import ProgramCache
llm = LLM(model="tiny-random", num_pages=32, compilation_cache=False, warmup=False)
llm.engine.runner.programs = ProgramCache(sys.argv[2]) if sys.argv[2] != "-" else None
out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))
print(out[0].token_ids, llm.engine.runner.loaded_programs)
"""


def test_stored_programs_are_compiled_afresh(tmp_path):
    """A program JAX's persistent cache already holds is compiled again before it is stored:
    on XLA:CPU the cache's executable, serialized again, loses its code and fails when run.
    Three processes: one fills JAX's cache, one stores programs, one loads and runs them."""
    import subprocess
    import sys

    jax_cache, programs = str(tmp_path / "jax"), str(tmp_path / "programs")

    def run(program_dir: str) -> str:
        done = subprocess.run([sys.executable, "-c", PROGRAM_CACHE_RUN, jax_cache, program_dir],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip()

    tokens, _ = run("-").rsplit(" ", 1)
    assert run(programs) == f"{tokens} 0"  # compiled (JAX's cache had them), then stored
    loaded_tokens, loaded = run(programs).rsplit(" ", 1)
    assert loaded_tokens == tokens and int(loaded) > 0
