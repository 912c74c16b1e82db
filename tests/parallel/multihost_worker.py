"""One process of a two-process job on CPU (`test_multihost.py`): joins the job, splits a model
over all processes' devices, prints its greedy tokens and prompt log-probabilities as JSON."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

from dendrite_jax.parallel import distributed  # noqa: E402


def main(model: str, address: str, process_id: int, tp: int) -> None:
    distributed.initialize(address, num_processes=2, process_id=process_id)
    import jax

    from dendrite_jax import LLM, SamplingParams

    prompts = [[(7 * i + j) % 400 + 3 for j in range(n)] for i, n in enumerate((5, 23, 40))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)
    llm = LLM(model=model, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=256, compilation_cache=False, tensor_parallel_size=tp)
    outs = llm.generate(prompts, params)
    kv = llm.engine.runner.kv.k
    print(json.dumps({
        "tokens": [o.token_ids for o in outs],
        "prompt_logprobs": [[entry[t].logprob for entry, t in
                             zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
                            for o in outs],
        "processes": jax.process_count(),
        "cache_devices": len(kv.sharding.device_set),
        "cache_processes": len({d.process_index for d in kv.sharding.device_set}),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
