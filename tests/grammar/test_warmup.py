"""Warm-up with a tokenizer compiles the split steps constrained decoding uses.

Run in a fresh process: a warm-up refuses to start near the process's memory-mapping limit
(each CPU program maps hundreds of regions), which the test session's own engines approach."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import re
from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.runner import FORWARD, SAMPLE

llm = LLM(model="smollm2-135m", dtype="float32", max_num_seqs=1, max_num_batched_tokens=16,
          max_model_len=64, warmup=True, split_constrained_steps=True)
kinds = {kind for _, kind in llm.engine.runner._compiled}
assert llm.engine.runner.frozen and {FORWARD, SAMPLE} <= kinds, kinds
before = llm.compilations
out = llm.generate(["Say a word:"], SamplingParams(max_tokens=8, regex="[a-z]{3,6}"))[0]
assert re.fullmatch("[a-z]{3,6}", out.text), out.text
assert llm.compilations == before
print("split steps warmed up")
"""


def test_warmup_compiles_the_split_steps():
    """A warmed-up engine (the compile guard on) serves constrained requests: warm-up compiled
    both halves of every decode-only step for a model with a tokenizer."""
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "split steps warmed up" in run.stdout
