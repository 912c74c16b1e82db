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
    from greedy_run import ENGINE, greedy_report

    from dendrite_jax import LLM

    llm = LLM(model=model, **ENGINE, tensor_parallel_size=tp)
    report = greedy_report(llm)
    kv = llm.engine.runner.kv.k
    print(json.dumps({
        **report,
        "processes": jax.process_count(),
        "cache_devices": len(kv.sharding.device_set),
        "cache_processes": len({d.process_index for d in kv.sharding.device_set}),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
