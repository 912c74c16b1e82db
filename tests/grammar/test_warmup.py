"""Warm-up with a tokenizer compiles the split steps constrained decoding uses.

In its own module: the test fixtures release compiled programs between modules, and a warm-up
refuses to start near the process's memory-mapping limit."""

from __future__ import annotations

import re

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.runner import FORWARD, SAMPLE


def test_warmup_compiles_the_split_steps():
    """A warmed-up engine (the compile guard on) serves constrained requests: warm-up compiled
    both halves of every decode-only step for a model with a tokenizer."""
    llm = LLM(model="smollm2-135m", dtype="float32", max_num_seqs=1, max_num_batched_tokens=16,
              max_model_len=64, warmup=True)
    kinds = {kind for _, kind in llm.engine.runner._compiled}
    assert llm.engine.runner.frozen and {FORWARD, SAMPLE} <= kinds
    before = llm.compilations
    out = llm.generate(["Say a word:"], SamplingParams(max_tokens=8, regex="[a-z]{3,6}"))[0]
    assert re.fullmatch("[a-z]{3,6}", out.text) and llm.compilations == before
