"""What the quality benchmarks share: a long English text, greedy prompts, perplexity."""

from __future__ import annotations

import math

import numpy as np

from dendrite_jax import LLM, SamplingParams


def long_text(tokenizer, tokens: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text)
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {tokens}")
    return ids[:tokens]


def perplexity(llm: LLM, ids: list[int]) -> float:
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    logprobs = [lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    return math.exp(-float(np.mean(logprobs)))


GREEDY_PROMPTS = ["The capital of France is", "Write a haiku about the sea:",
                  "List three prime numbers:", "def fibonacci(n):",
                  "The three laws of motion are", "Translate to French: good morning",
                  "A recipe for pancakes:", "The largest planet in the solar system"]
