"""Run in a subprocess with forced host devices: greedy tokens and prompt log-probabilities of a
model at each tensor-parallel size, as JSON on stdout (`test_tensor.py`)."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from greedy_run import ENGINE, PARAMS, PROMPTS, greedy_report  # noqa: E402

from dendrite_jax import LLM  # noqa: E402
from dendrite_jax.parallel.replicas import DataParallelLLM  # noqa: E402


def main(model: str, sizes: list[int], replicas: list[tuple[int, int]],
         backend: str = "auto", layer_loop: str = "auto") -> None:
    report = {}
    for tp in sizes:
        llm = LLM(model=model, **ENGINE, tensor_parallel_size=tp, attention_backend=backend,
                  layer_loop=layer_loop)
        head = llm.model.params.lm_head
        report[tp] = {**greedy_report(llm),
                      "devices": len(llm.engine.runner.kv.k.sharding.device_set),
                      "lm_head_columns": None if head is None else
                      head.addressable_shards[0].data.shape[-1],
                      # what a step returns for the next one keeps its sharding (a GPU refuses
                      # a changed one)
                      "slots_replicated": all(a.sharding.is_fully_replicated for a in
                                              jax.tree.leaves(llm.engine.runner.slots))}
    for dp, tp in replicas:  # data-parallel replicas (of tensor-parallel models)
        llm = DataParallelLLM(model, data_parallel_size=dp, tensor_parallel_size=tp, **ENGINE)
        devices = {d for replica in llm.replicas for d in replica.engine.runner.kv.k.devices()}
        report[f"{dp}x{tp}"] = {"tokens": [o.token_ids for o in llm.generate(PROMPTS, PARAMS)],
                                "devices": len(devices)}
    print(json.dumps(report))


if __name__ == "__main__":
    replicas = [tuple(int(x) for x in r.split("x")) for r in sys.argv[3].split(",")
                if r] if len(sys.argv) > 3 else []
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], replicas,
         *sys.argv[4:6])
