"""The engine on the Pallas attention kernels (interpret mode on CPU) gives the reference
backend's greedy tokens, through chunked prefill, decode and full-width page tables."""

from __future__ import annotations

import pytest

from dendrite_jax import LLM, SamplingParams

CONFIG = dict(model="tiny-random", page_size=16, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=128, compilation_cache=False, warmup=False)


@pytest.fixture(scope="module")
def reference():
    return LLM(**CONFIG, attention_backend="reference")


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_kernel_backend_matches_reference(reference, backend):
    prompts = [[(7 * i + j) % 500 + 1 for j in range(n)] for i, n in enumerate((5, 40, 17))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kernels = LLM(**CONFIG, attention_backend=backend)
    expected = [o.token_ids for o in reference.generate(prompts, params)]
    assert [o.token_ids for o in kernels.generate(prompts, params)] == expected
    for llm in (kernels, reference):
        widths = {s.pages_per_seq for s in llm.engine.runner.compiled_shapes}
        assert widths == {8}  # 128 tokens / 16 per page: one width for every step
