"""Run in a subprocess with forced host devices: greedy tokens and prompt log-probabilities of a
model at each tensor-parallel size, as JSON on stdout (`test_tensor.py`)."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

from dendrite_jax import LLM, SamplingParams  # noqa: E402
from dendrite_jax.parallel.replicas import DataParallelLLM  # noqa: E402


def main(model: str, sizes: list[int], replicas: list[tuple[int, int]],
         backend: str = "auto") -> None:
    prompts = [[(7 * i + j) % 400 + 3 for j in range(n)] for i, n in enumerate((5, 23, 40))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)
    report = {}
    for tp in sizes:
        llm = LLM(model=model, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                  max_model_len=256, compilation_cache=False, tensor_parallel_size=tp,
                  attention_backend=backend)
        outs = llm.generate(prompts, params)
        report[tp] = {
            "tokens": [o.token_ids for o in outs],
            "prompt_logprobs": [[entry[t].logprob for entry, t in
                                 zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
                                for o in outs],
            "devices": len({d for a in (llm.engine.runner.kv.k,) for d in a.devices()}),
        }
    for dp, tp in replicas:  # data-parallel replicas (of tensor-parallel models)
        llm = DataParallelLLM(model, data_parallel_size=dp, tensor_parallel_size=tp,
                              dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                              max_model_len=256, compilation_cache=False)
        devices = {d for replica in llm.replicas for d in replica.engine.runner.kv.k.devices()}
        report[f"{dp}x{tp}"] = {"tokens": [o.token_ids for o in llm.generate(prompts, params)],
                                "devices": len(devices)}
    print(json.dumps(report))


if __name__ == "__main__":
    replicas = [tuple(int(x) for x in r.split("x")) for r in sys.argv[3].split(",")
                if r] if len(sys.argv) > 3 else []
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], replicas,
         *(sys.argv[4:5] or ["auto"]))
