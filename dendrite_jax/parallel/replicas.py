"""Data parallelism: replicas of one model, each on its own devices, serving a share of requests.

`DataParallelLLM(model, data_parallel_size=2, tensor_parallel_size=2)` builds two `LLM`s on
devices [0, 1] and [2, 3] (each tensor-parallel over its pair). `generate` spreads the prompts
over the replicas (round robin), then steps every replica's engine in turn until all are done:
JAX dispatches a step without waiting for the device, so on accelerators the replicas' steps run
at the same time. Outputs come back in prompt order. Replicas share nothing; each request's
pages live on its replica.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from dendrite_jax.engine.outputs import RequestOutput
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.groups import RequestGroup, group_requests, start_groups
from dendrite_jax.frontend.llm import LLM
from dendrite_jax.frontend.prompts import Prompt, params_per_prompt, prompt_list


class DataParallelLLM:
    def __init__(self, model: str = "smollm2-135m", *, data_parallel_size: int,
                 tensor_parallel_size: int = 1, **kwargs) -> None:
        needed = data_parallel_size * tensor_parallel_size
        devices = jax.devices()
        if data_parallel_size < 1 or needed > len(devices):
            raise ValueError(f"data_parallel_size {data_parallel_size} x tensor_parallel_size "
                             f"{tensor_parallel_size} needs {needed} devices; {len(devices)} "
                             f"present ({jax.default_backend()})")
        tp = tensor_parallel_size
        self.replicas = [LLM(model, tensor_parallel_size=tp, devices=devices[r * tp:(r + 1) * tp],
                             **kwargs) for r in range(data_parallel_size)]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """As `LLM.generate`, with prompt i served by replica i mod data_parallel_size."""
        prompts = prompt_list(prompts)
        params_list = params_per_prompt(sampling_params, len(prompts))
        n = len(self.replicas)
        shares = [list(range(r, len(prompts), n)) for r in range(n)]
        started: list[list[RequestGroup]] = []  # per replica, its prompts' groups
        try:
            for replica, share in zip(self.replicas, shares, strict=True):
                started.append(start_groups(replica.engine, [prompts[i] for i in share],
                                            [params_list[i] for i in share]))
            while busy := [replica for replica, groups in zip(self.replicas, started, strict=True)
                           if not all(g.finished for g in groups)]:
                for replica in busy:
                    replica.engine.step()
            for replica in self.replicas:
                replica.engine.drain()
        finally:  # a bad prompt for a later replica, or a failed step: strand no pages
            for replica, groups in zip(self.replicas, started, strict=False):
                for r in group_requests(groups):
                    if not r.finished:
                        replica.engine.abort(r.request_id)
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for share, groups in zip(shares, started, strict=True):
            for i, group in zip(share, groups, strict=True):
                outputs[i] = group.output()
        return outputs
