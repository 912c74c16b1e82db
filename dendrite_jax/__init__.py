"""dendrite-jax: a JAX/XLA inference runtime for large language models."""

from dendrite_jax.engine.outputs import Logprob, RequestOutput
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.llm import LLM
from dendrite_jax.search.beam import BeamSearchOutput, BeamSearchParams

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "Logprob", "RequestOutput",
           "SamplingParams"]
