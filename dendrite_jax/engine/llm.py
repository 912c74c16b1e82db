"""LLM: the public entry point, shaped like vLLM's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dendrite_jax.config import EngineConfig, ModelConfig
from dendrite_jax.engine.engine import Engine
from dendrite_jax.engine.outputs import RequestOutput
from dendrite_jax.engine.runner import enable_compilation_cache
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.params import resolve_layer_loop, with_layer_loop
from dendrite_jax.model.tokenizer import Tokenizer
from kernels_pallas.paged_attention import resolve_backend

Prompt = str | list[int]


class LLM:
    """A model plus its serving engine.

    >>> llm = LLM(model="smollm2-135m", dtype="float32")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].text
    """

    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", *,
                 page_size: int = 16, num_pages: int | None = None, max_num_seqs: int = 8,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 kv_cache_bytes: int = EngineConfig.kv_cache_bytes, seed: int = 0,
                 attention_backend: str = "auto", layer_loop: str = "auto",
                 compilation_cache: bool = True) -> None:
        engine_cfg = EngineConfig(dtype=dtype, page_size=page_size, num_pages=num_pages,
                                  max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  max_model_len=max_model_len, kv_cache_bytes=kv_cache_bytes,
                                  seed=seed)
        backend = resolve_backend(attention_backend)
        loop = resolve_layer_loop(layer_loop)
        if compilation_cache:
            enable_compilation_cache()
        loaded = load_model(model, dtype)
        self.model = dataclasses.replace(loaded, params=with_layer_loop(loaded.params, loop))
        del loaded
        self.engine = Engine(self.model, engine_cfg, backend)

    @property
    def tokenizer(self) -> Tokenizer:
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.source} has no tokenizer; pass token-id prompts")
        return self.model.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids). Every request is validated
        before any runs; outputs come back in prompt order."""
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} "
                                 "prompts; pass one, or one per prompt")
        requests = []
        for prompt, params in zip(prompts, params_list, strict=True):
            if not isinstance(params, SamplingParams):
                raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
            if isinstance(prompt, str):
                requests.append(self.engine.make_request(prompt, self.tokenizer.encode(prompt),
                                                         params))
            else:
                requests.append(self.engine.make_request(None, list(prompt), params))
        for r in requests:
            self.engine.add(r)
        try:
            while self.engine.has_unfinished():
                self.engine.step()
        except BaseException:
            # An error or interrupt mid-run must not strand pages: release every request.
            for r in requests:
                self.engine.abort(r)
            raise
        return [r.output() for r in requests]

    @property
    def compilations(self) -> int:
        return self.engine.runner.compilations


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if all(isinstance(p, int) for p in prompts):
        return [prompts]
    for p in prompts:
        if not (isinstance(p, str) or (isinstance(p, list | tuple) and
                                       all(isinstance(t, int) for t in p))):
            raise ValueError(f"each prompt must be a string or a list of token ids, got {p!r:.80}")
    return [p if isinstance(p, str) else list(p) for p in prompts]
