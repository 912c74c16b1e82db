"""LLM: the public entry point, shaped like vLLM's."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax

from dendrite_jax.config import SETTINGS, EngineConfig, ModelConfig, load_engine_preset
from dendrite_jax.engine.engine import Engine, EngineStats
from dendrite_jax.engine.outputs import RequestOutput
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.runner import enable_compilation_cache
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.settings import resolve
from dendrite_jax.frontend.groups import group_requests, start_groups
from dendrite_jax.frontend.prompts import Prompt, params_per_prompt, prompt_list, prompt_token_ids
from dendrite_jax.frontend.streaming import CompletionDelta, GroupStream
from dendrite_jax.model import tensor_parallel
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.params import with_layer_loop
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.quant.fp8 import quantize_weights, weight_scheme
from dendrite_jax.search.beam import BeamSearchOutput, BeamSearchParams, beam_search


class LLM:
    """A model plus its serving engine.

    >>> llm = LLM(model="smollm2-135m", dtype="float32")
    >>> out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].text

    Keyword settings are `EngineConfig`'s fields (an unknown name is a TypeError); those left
    None or "auto" are decided for the platform once (`engine.settings.resolve`), and
    `stats().config` reports what was decided. The command lines (`run`, `serve`) take the
    same settings as flags, derived from the dataclass.

    `model` is a preset name, a preset .toml, a .gguf file, a Hugging Face checkpoint directory
    or a Hugging Face repo id (`Qwen/Qwen3-0.6B`), found in the local Hugging Face cache
    ($HF_HUB_CACHE, else $HF_HOME/hub) at `revision` (a branch, tag or commit; default main)
    and downloaded only with `allow_download=True` (never while HF_HUB_OFFLINE is set). A local
    path that exists wins over a repo id (`model.loader`, `model.hub`).

    `tokenizer` (a Hugging Face tokenizer directory, a .gguf file or a repo id) replaces the
    model's own, or gives a random-weight preset one (for structured output at benchmark
    sizes). `chat_template` (a Jinja file or the template text) replaces its chat template.

    `kv_compression` ("none", "turboquant-4", "polarquant-4", "qjl-256", ...; see
    `kernels_pallas.codecs.kv.make_kv_compression`) keeps the KV cache as codes: more pages fit
    in `kv_cache_bytes`. "auto" attention reads TurboQuant codes with Pallas kernels on a GPU
    (and MSE-stage ones, "turboquant-mse-<1|2|4|8>", on a TPU; `kernels_pallas.kv_compress`);
    other compressions, and CPUs, use the reference.

    `weights_dtype` ("fp8" = "mxfp8", or "fp8-channel"; None keeps `dtype`) stores every layer's
    projections as FP8 with their scales (`quant.fp8`), quantized at load; activations, norms,
    embeddings and the LM head stay in `dtype`. `fp8_fold_norms` folds the attention and MLP
    norms' weights into q/k/v and gate/up, which then normalise their input themselves
    (`quant.fp8`: on GPUs at batch 1 the norms cost no kernels); default (None): for MXFP8, not
    for per-channel FP8, whose quality it costs (`quant.fp8.FOLD_NORMS`). `fp8_matmul` picks
    how they are multiplied (`kernels_pallas.fp8_matmul`: "auto" streams FP8 through the
    platform's Pallas kernel on GPUs and TPUs for decode-sized matmuls, "reference" dequantizes
    then multiplies). `fp8_keep_layers` (layer indices, negative from the end) stay in `dtype`:
    outliers that arise in the first layers and the last layer's direct effect on the logits
    make them the most sensitive (on SmolLM2 with per-channel FP8, keeping layers 0, 1 and -1
    halves the perplexity increase; MXFP8 with its norms folded gains nothing from it).

    `tensor_parallel_size` splits the model over that many devices (`model.tensor_parallel`):
    heads and MLP units per device, the KV cache on its heads, one all-reduce after each
    attention and MLP block. `devices` places it on those devices (as many as the size; default
    the first ones): how `parallel.replicas` puts each data-parallel replica on its own.

    `split_constrained_steps` launches decode steps with constrained rows as two executables
    (model, then sampling with the token mask) so the host fills the mask while the device runs
    the model; default (None): off, as False (`LaunchPipeline.splits`: the halves are two more
    programs per step shape at warm-up, and regular constraints run as device automata).

    `threaded_launch` makes constrained steps' executable calls from a worker thread, which
    overlaps them with the host's matcher and mask work; default (None): on accelerators for
    steps of 16 rows or more, where a call costs the host about as long as a small model's
    step and the host's work outlasts the device's (`LaunchPipeline.threads`); never on a CPU.

    `decode_burst` runs that many decode steps per launch while every running request decodes
    freely (no host-matched constraint (device automata decode freely), none waiting to be
    admitted, that many tokens left to each):
    the host's per-step work is paid once per burst; a request that stops mid-burst drops
    the rest. Default (None): 4 on accelerators, 1 on a CPU (`EngineConfig.resolve`).

    `forced_tokens` appends the tokens a constraint forces (its mask allows one token) without
    sampling them and feeds them several to a row in the next step: fewer steps for
    structured output, the same tokens; those tokens' logprobs are not computed, so they add
    nothing to `cumulative_logprob`, and requests asking for logprobs or ranked by them
    (`best_of`) sample every token. Its multi-token rows make constrained steps mixed, so with
    it mixed steps launch split too (`LaunchPipeline.splits`; warm-up compiles their halves). It pays
    at small batches for schemas that force many tokens; at large batches some row has a forced
    run almost every step, the steps are mixed and slower, and it costs more than it saves
    (benchmarks/README.md). Hence off by default.

    `device_automata` runs regular constraints (regex, choice, JSON schemas in
    `grammar.json_regex`'s subset) as automata on the device (`grammar.device_automaton`): the
    step masks and advances them itself, so their rows need no host round trip per token and
    decode in bursts like free rows, with the masks llguidance gives. `automaton_states` sizes
    its table (states of all grammars in use; states x vocabulary x 2 bytes). Default (None):
    on accelerators, not on a CPU. Lark grammars, patterns outside `grammar.regex_syntax`,
    other schemas and grammars past the table's room keep llguidance's matchers on the host
    (`StructuredOutput.automaton_reasons` says why).

    `warmup` compiles every step bucket up front and then makes compiling a new one an error
    (default: on for accelerators, off on CPU where compiling on demand is cheaper).
    """

    def __init__(self, model: str = "smollm2-135m", dtype: str = "float32", *,
                 tokenizer: str | None = None, revision: str | None = None,
                 allow_download: bool = False, chat_template: str | None = None,
                 devices: Sequence[jax.Device] | None = None, **settings) -> None:
        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise TypeError(f"LLM got unknown settings {unknown}; the engine's settings are "
                            f"EngineConfig's fields: {sorted(SETTINGS)}")
        if isinstance(settings.get("fp8_keep_layers"), list):
            settings["fp8_keep_layers"] = tuple(settings["fp8_keep_layers"])
        chosen = EngineConfig(dtype=dtype, **settings)
        if chosen.compilation_cache:
            enable_compilation_cache()
        loaded = load_model(model, dtype, tokenizer, revision=revision,
                            allow_download=allow_download, chat_template=chat_template)
        platform = (devices[0] if devices else jax.devices()[0]).platform
        on_mesh = chosen.tensor_parallel_size > 1 or devices is not None
        cfg = resolve(chosen, platform, head_dim=loaded.config.head_dim, on_mesh=on_mesh)
        if cfg.weights_dtype is not None:
            loaded = dataclasses.replace(loaded, params=quantize_weights(
                loaded.params, weight_scheme(cfg.weights_dtype), matmul=cfg.fp8_matmul,
                keep_layers=cfg.fp8_keep_layers,
                rms_norm_eps=loaded.config.rms_norm_eps if cfg.fp8_fold_norms else None))
        mesh = None
        if on_mesh:
            loaded, mesh = _tensor_parallel(loaded, cfg.tensor_parallel_size, devices)
        params = with_layer_loop(loaded.params, cfg.layer_loop, consume=True)
        if mesh is not None:
            params = jax.device_put(params, tensor_parallel.param_shardings(params, mesh))
        self.model = dataclasses.replace(loaded, params=params)
        del loaded, params
        self.engine = Engine(self.model, cfg, mesh=mesh)
        if cfg.warmup:
            self.engine.warmup()

    @classmethod
    def from_engine_preset(cls, preset: str, **kwargs) -> LLM:
        """An LLM with an engine preset's settings (`configs/engine/<preset>.toml`: "cpu",
        "gpu-serving", "long-context", or a path); keyword arguments override them."""
        return cls(**{**load_engine_preset(preset, SETTINGS), **kwargs})

    @property
    def tokenizer(self) -> Tokenizer:
        if self.model.tokenizer is None:
            raise ValueError(f"{self.model.source} has no tokenizer; pass token-id prompts")
        return self.model.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def compilations(self) -> int:
        return self.engine.runner.compilations

    def stats(self) -> EngineStats:
        """Pool usage and watermarks, prefix-cache hit rate, compilations, preemptions."""
        return self.engine.stats()

    # ----------------------------------------------------------------------------- requests

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> str:
        """Queue one request without running it; returns its request id."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        prompts = prompt_list(prompt)
        if len(prompts) != 1:
            raise ValueError(f"add_request takes one prompt, got {len(prompts)}")
        if params.num_sequences > 1:
            raise ValueError("add_request takes one sequence per request; for n or best_of use "
                             "generate or stream")
        return start_groups(self.engine, prompts, [params])[0].request_id

    def abort(self, request_id: str) -> bool:
        """Stop a queued or running request and free its pages."""
        return self.engine.abort(request_id)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids). Every request is validated
        before any runs; outputs come back in prompt order. Requests are served by continuous
        batching together with any others already queued."""
        prompts = prompt_list(prompts)
        params_list = params_per_prompt(sampling_params, len(prompts))
        groups = start_groups(self.engine, prompts, params_list)
        requests = group_requests(groups)
        with self._aborting_on_error(requests):
            while not all(r.finished for r in requests):
                self.engine.step()
            self.engine.drain()
        return [group.output() for group in groups]

    def beam_search(self, prompts: Prompt | Sequence[Prompt],
                    params: BeamSearchParams | None = None) -> list[BeamSearchOutput]:
        """Beam search for each prompt, scored as transformers' `generate(num_beams=...)`
        (`dendrite_jax.search.beam`). Beams share pages copy-on-write. Runs on an idle engine:
        requests queued with `add_request` must finish first."""
        params = params or BeamSearchParams()
        ids = [prompt_token_ids(self.model, p) for p in prompt_list(prompts)]
        for p in ids:
            self.engine.check_prompt(p)
        return beam_search(self.engine, ids, params)

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[CompletionDelta]:
        """Yield each request's new text, tokens and logprobs as they are generated
        (`frontend.streaming`; `index` tells a prompt's n completions apart). Closing the
        generator early aborts the requests it started."""
        prompts = prompt_list(prompts)
        params_list = params_per_prompt(sampling_params, len(prompts))
        if any(p.best_of and p.best_of > p.n for p in params_list):
            raise ValueError("stream cannot rank best_of sequences before they end; use generate")
        groups = start_groups(self.engine, prompts, params_list)
        requests = group_requests(groups)
        group_streams = [GroupStream(g) for g in groups]
        streams = {r.request_id: s for s in group_streams for r in s.group.requests}
        with self._aborting_on_error(requests):
            for r in requests:
                if r.finished:  # failed at admission (a constraint that does not compile)
                    yield from streams[r.request_id].advance(r)
            while not all(s.finished for s in group_streams):
                for r in self.engine.step():
                    if r.request_id in streams:
                        yield from streams[r.request_id].advance(r)
            self.engine.drain()

    @contextlib.contextmanager
    def _aborting_on_error(self, requests: list[Request]) -> Iterator[None]:
        """An error, interrupt or early close mid-run must not strand pages: abort these."""
        try:
            yield
        except BaseException:
            for r in requests:
                self.engine.abort(r.request_id)
            with contextlib.suppress(Exception):  # the step in flight may be what failed
                self.engine.drain()
            raise
        finally:
            for r in requests:
                if not r.finished:
                    self.engine.abort(r.request_id)


def _tensor_parallel(loaded, tp: int, devices: Sequence[jax.Device] | None):
    """The model regrouped for `tp` devices (`model.tensor_parallel`), and their mesh (over
    `devices`, default the first `tp`)."""
    devices = list(devices) if devices is not None else jax.devices()[:tp]
    if len(devices) != tp:
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} devices; got {len(devices)}")
    tensor_parallel.check(loaded.config, tp)
    cfg = dataclasses.replace(loaded.config, shards=tp)
    params = (tensor_parallel.regroup(loaded.params, loaded.config, tp) if tp > 1
              else loaded.params)
    return (dataclasses.replace(loaded, config=cfg, params=params),
            tensor_parallel.make_mesh(tp, devices))
