"""dendrite-jax: a JAX/XLA inference runtime for large language models."""

from dendrite_jax.engine.llm import LLM
from dendrite_jax.engine.outputs import Logprob, RequestOutput
from dendrite_jax.engine.sampling_params import SamplingParams

__all__ = ["LLM", "Logprob", "RequestOutput", "SamplingParams"]
