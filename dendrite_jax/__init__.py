"""dendrite-jax: a JAX/XLA inference runtime for large language models.

The public names load on first use (PEP 562), so importing one submodule does not import the
whole engine: `kernels_pallas` modules import `dendrite_jax.quant.fp8`, which the model imports
in turn, and an eager package import made that a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dendrite_jax.engine.llm import LLM
    from dendrite_jax.engine.outputs import Logprob, RequestOutput
    from dendrite_jax.engine.sampling_params import SamplingParams
    from dendrite_jax.search.beam import BeamSearchOutput, BeamSearchParams

_EXPORTS = {
    "LLM": "dendrite_jax.engine.llm",
    "Logprob": "dendrite_jax.engine.outputs",
    "RequestOutput": "dendrite_jax.engine.outputs",
    "SamplingParams": "dendrite_jax.engine.sampling_params",
    "BeamSearchOutput": "dendrite_jax.search.beam",
    "BeamSearchParams": "dendrite_jax.search.beam",
}

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "Logprob", "RequestOutput",
           "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dendrite_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
