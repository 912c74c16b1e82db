"""The run both parallel workers make (`tp_worker.py`, `multihost_worker.py`): a few greedy
requests, reported as tokens and prompt log-probabilities. Import after setting XLA_FLAGS."""

from __future__ import annotations

from dendrite_jax import LLM, SamplingParams

PROMPTS = [[(7 * i + j) % 400 + 3 for j in range(n)] for i, n in enumerate((5, 23, 40))]
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)
ENGINE = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=256,
              compilation_cache=False)


def greedy_report(llm: LLM) -> dict:
    outs = llm.generate(PROMPTS, PARAMS)
    return {"tokens": [o.token_ids for o in outs],
            "prompt_logprobs": [[entry[t].logprob for entry, t in
                                 zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
                                for o in outs]}
