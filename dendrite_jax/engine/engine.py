"""Engine: turns scheduled batches into StepPlans, runs them, and routes results to requests."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import PLAIN_KV, KVCache
from dendrite_jax.cache.pool import PagePool, PoolStats
from dendrite_jax.cache.prefix_cache import PrefixCache, PrefixCacheStats
from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.buckets import decode_rows_floor
from dendrite_jax.engine.kv_blocks import KVBlockManager
from dendrite_jax.engine.pipeline import Launched, LaunchPipeline
from dendrite_jax.engine.planner import StepPlanner
from dendrite_jax.engine.request import Request, RequestStatus
from dendrite_jax.engine.runner import ModelRunner
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.scheduler import ScheduledBatch, Scheduler
from dendrite_jax.engine.step_output import StepResult
from dendrite_jax.engine.step_plan import StepPlan, StepShape
from dendrite_jax.engine.structured import StructuredOutput, appends_sample
from dendrite_jax.model.calibration import calibration_ids
from dendrite_jax.model.loader import LoadedModel
from dendrite_jax.quant import fp8
from dendrite_jax.validation import ParamError, is_int
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE
from kernels_pallas.paged_attention.tail import FullPrecisionTail


def step_compiler_options(platform: str, cfg: EngineConfig) -> dict[str, Any]:
    """XLA options of the step programs: on GPUs, cuBLAS GEMMs unless `triton_gemms`."""
    if platform == "gpu" and not cfg.triton_gemms:
        return {"xla_gpu_enable_triton_gemm": False}
    return {}


def default_num_pages(model: LoadedModel, cfg: EngineConfig, max_model_len: int) -> int:
    """Enough pages for every slot at full length, capped by the kv_cache_bytes budget."""
    if cfg.kv_compression in PLAIN_KV:
        dtype = cfg.dtype if cfg.kv_compression == "none" else FP8_DTYPE
        per_page = KVCache.bytes_per_page(model.config, cfg.page_size, dtype)
    else:
        per_page = CompressedKVCache.bytes_per_page(model.config, cfg.page_size,
                                                    cfg.kv_compression)
    full = cfg.max_num_seqs * math.ceil(max_model_len / cfg.page_size)
    budget = cfg.kv_cache_bytes
    if cfg.kv_full_precision_window:  # the tail's slots come out of the same budget
        c = model.config
        budget -= cfg.max_num_seqs * FullPrecisionTail.bytes_per_slot(
            c.num_layers, cfg.kv_full_precision_window, c.num_kv_heads, c.head_dim, cfg.dtype)
        if budget < 2 * per_page:
            raise ValueError(f"kv_cache_bytes ({cfg.kv_cache_bytes}) leaves no room for pages "
                             f"beside the full-precision tail ({cfg.kv_cache_bytes - budget} "
                             "bytes); raise it or lower kv_full_precision_window")
    return max(2, min(full, budget // per_page))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    pool: PoolStats
    prefix_cache: PrefixCacheStats | None
    compilations: int
    compile_seconds: float  # summed over warm-up's threads; persistent-cache loads included
    preemptions: int
    steps: int
    waiting: int
    running: int
    config: EngineConfig  # every setting, platform defaults resolved (`EngineConfig.resolve`)
    attention_backend: str


class Engine:
    def __init__(self, model: LoadedModel, cfg: EngineConfig, *, mesh=None) -> None:
        """`cfg`: resolved settings (`engine.settings.resolve`), which `stats()` reports."""
        self.platform = jax.devices()[0].platform
        self.model = model
        self.cfg = cfg
        context = model.config.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > context:
            raise ValueError(f"max_model_len ({cfg.max_model_len}) exceeds the model's context "
                             f"({context})")
        self.max_model_len = cfg.max_model_len or context
        num_pages = cfg.num_pages or default_num_pages(model, cfg, self.max_model_len)
        self.pool = PagePool(num_pages)
        self.prefix_cache = PrefixCache(self.pool, cfg.page_size) if cfg.enable_prefix_caching else None
        self.blocks = KVBlockManager(self.pool, cfg.page_size, self.prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   # a tail is per slot: a sample reading its sibling's
                                   # prompt pages would miss that prompt's tail
                                   share_sibling_prompts=not cfg.kv_full_precision_window)
        self.runner = ModelRunner(model.config, model.params, num_pages=num_pages,
                                  page_size=cfg.page_size, num_slots=cfg.max_num_seqs,
                                  dtype=cfg.dtype, attention_backend=cfg.attention_backend,
                                  kv_compression=cfg.kv_compression,
                                  calibration=None if cfg.kv_compression == "none" else
                                  calibration_ids(model.tokenizer, model.config.vocab_size),
                                  full_precision_window=cfg.kv_full_precision_window,
                                  mesh=mesh, compiler_options=step_compiler_options(
                                      self.platform, cfg))
        self.burst = cfg.decode_burst
        self.planner = StepPlanner(cfg, self.max_model_len, burst=self.burst,
                                   logit_bias=self.runner.logit_bias,
                                   min_decode_rows=decode_rows_floor(
                                       self.platform,
                                       fp8_kernel=fp8.multiplied_by(model.params, "pallas_gpu")))
        self.requests: dict[str, Request] = {}
        self.pipeline = LaunchPipeline(self.runner, cfg)
        self.structured = StructuredOutput(model, cfg, self.runner,
                                           device_automata=cfg.device_automata,
                                           sync=self.pipeline.sync)
        self._failed: list[Request] = []  # failed at admission, not yet returned by step()
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self.num_steps = 0
        # Time step() spent on the host (planning, launching, applying; launches included):
        # the overlap's effect shows as host work hidden in the pipeline's waits.
        self.host_seconds = 0.0

    @property
    def wait_seconds(self) -> float:
        """Time step() spent blocked on the device's results."""
        return self.pipeline.wait_seconds

    @property
    def launch_seconds(self) -> float:
        """Time inside the runner's calls (transfer, dispatch)."""
        return self.pipeline.launch_seconds

    # ----------------------------------------------------------------------------- requests

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """Raise ValueError naming what is wrong with a prompt (empty, bad ids, too long)."""
        n, vocab = len(prompt_ids), self.model.config.vocab_size
        if n == 0:
            raise ParamError("prompt", "prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not (is_int(t) and 0 <= t < vocab)]
        if bad:
            raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab}); "
                             f"got {bad[:5]}")
        if n >= self.max_model_len:
            raise ParamError("prompt", f"prompt has {n:,} tokens; the model's context is "
                             f"{self.max_model_len:,} (max_model_len), which leaves no room to "
                             "generate")

    def make_request(self, prompt: str | None, prompt_ids: list[int],
                     params: SamplingParams, ranked: bool = False) -> Request:
        """Validate a request at the boundary; raises ValueError naming the problem. `ranked`:
        one of `best_of` completions, which are ranked by cumulative logprob."""
        self.check_prompt(prompt_ids)
        vocab = self.model.config.vocab_size
        outside = [t for t in params.logit_bias or () if t >= vocab]
        if outside:
            raise ParamError("logit_bias", f"logit_bias token ids must be below the vocabulary "
                             f"size {vocab}; got {outside[:5]}")
        n = len(prompt_ids)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        request = Request(str(self._next_id), prompt, [int(t) for t in prompt_ids], params,
                          seed % 2**32, self.max_model_len, self.model.tokenizer,
                          self.model.tokenizer.stop_token_ids if self.model.tokenizer else (),
                          ranked=ranked)
        needed, capacity = self.blocks.pages_for(request.max_len), self.blocks.capacity
        if needed > capacity:
            raise ParamError("max_tokens", f"request needs {needed} KV pages (prompt {n} + "
                             f"max_tokens {params.max_tokens} tokens) but the cache has "
                             f"{capacity}; raise num_pages or lower max_tokens")
        self._next_id += 1
        if params.constrained:
            self.structured.attach(request)
        return request

    def add(self, request: Request) -> None:
        if not request.finished:  # what the constraint forces first
            self.structured.fast_forward(request, self.max_model_len)
        if request.finished:  # failed at admission, or forced to its end: the next step says so
            self._failed.append(request)
            return
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages. False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None or request.finished:
            return False
        self.scheduler.abort(request)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.pipeline.busy

    # ----------------------------------------------------------------------------- steps

    def step(self) -> list[Request]:
        """Launch the next step, then read back and apply the previous one.

        The device runs step N+1 while the host applies step N's tokens (detokenization, stop
        checks, prefix-cache commits) and plans step N+2. Planning is optimistic: launched
        tokens count as computed and a sampled token is a placeholder that the device reads
        from its per-slot buffer. A request that turns out to have finished at step N had its
        row in step N+1 computed for nothing; that row's output is dropped.
        Returns the requests whose output changed.
        """
        start, waited = time.perf_counter(), self.wait_seconds
        touched, self._failed = self._failed, []
        if self.pipeline.ahead is not None or (self.pipeline.in_flight is not None and
                                               self.structured.pending(self.scheduler.running)):
            touched += self._constrained_step()
        else:
            batch, launched = self._schedule(), None
            if batch.rows:
                plan = self._plan(batch)
                launched = self.pipeline.launch(batch, plan,
                                                self.structured.token_mask(batch, plan))
            elif not self.pipeline.in_flight and not touched:
                raise RuntimeError("the scheduler found nothing to run although requests "
                                   "are waiting")
            previous = self.pipeline.swap(launched)
            if previous is not None:
                touched += self._apply(previous)
        self.host_seconds += time.perf_counter() - start - (self.wait_seconds - waited)
        return touched

    def _constrained_step(self) -> list[Request]:
        """A step while a host-matched row's next mask depends on the token in flight.

        Where `LaunchPipeline.splits` says so, a step launches in two halves: its forward as
        soon as it is planned, then, once the step before it is applied (the matchers
        advanced) and its mask filled, its sampling with that mask. The next step is planned
        and its forward launched right behind that sampling, so the device runs the model
        while the host reads back, advances the matchers and fills the next mask. Steps that
        do not split launch whole once the step before is applied.
        """
        if self.pipeline.ahead is None:
            self._plan_ahead()
        touched = self._apply_in_flight()  # the matchers take the tokens in flight
        if self.pipeline.ahead is not None:
            self.pipeline.release_ahead(self.structured.token_mask)
            if self.structured.pending(self.scheduler.running):
                self._plan_ahead()
        return touched

    def _plan_ahead(self) -> None:
        """Schedule and plan a step whose mask may still depend on the step in flight."""
        batch = self.scheduler.schedule()
        if batch.rows:
            self.pipeline.launch_ahead(batch, self._plan(batch))

    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        """The step's plan; its tokens count as computed and its samples as pending."""
        plan = self.planner.build(batch, self.structured.automaton_states(
            [r for r, _ in batch.rows]))
        for row, (r, n) in enumerate(batch.rows):  # plan row i is the batch's i-th row
            r.num_computed += n * batch.steps
            if plan.sample[row]:
                r.add_pending(batch.steps)
        self.num_steps += 1
        return plan

    def drain(self) -> list[Request]:
        """Apply the step in flight and finish a step already planned (its forward may be
        running), launching nothing new."""
        touched = self._apply_in_flight()
        if self.pipeline.ahead is not None:
            self.pipeline.release_ahead(self.structured.token_mask)
            touched += self._apply_in_flight()
        self.pipeline.sync()
        return list({r.request_id: r for r in touched}.values())

    def _apply_in_flight(self) -> list[Request]:
        previous = self.pipeline.swap(None)
        return [] if previous is None else self._apply(previous)

    def _schedule(self) -> ScheduledBatch:
        """A burst of `self.burst` decode steps where the running requests allow one, else
        the scheduler's next step."""
        if self.burst > 1:
            batch = self.scheduler.schedule_burst(self.burst)
            if batch is not None:
                return batch
        return self.scheduler.schedule()

    def warmup(self, shapes: list[StepShape] | None = None, freeze: bool = True) -> int:
        """Compile every shape the scheduler can produce (and the split steps constrained
        decoding uses, where they are on), in parallel; afterwards a new shape raises. With
        `shapes`, compile those and keep compiling on demand unless `freeze`. Returns the
        number of step shapes."""
        if shapes is None:
            shapes = self.planner.step_shapes()
        self.runner.warmup(shapes, split=self.pipeline.splits if self.model.tokenizer is not None
                           else lambda shape: False, freeze=freeze)
        return len(shapes)

    def _apply(self, launched: Launched) -> list[Request]:
        """Route a finished launch's results (one per step of a burst) to its requests,
        which were advanced at launch. Each request is listed once."""
        touched: dict[str, Request] = {}
        for result in self.pipeline.results(launched):
            for r in self._apply_step(launched.batch, launched.plan, result):
                touched[r.request_id] = r
        return list(touched.values())

    def _apply_step(self, batch: ScheduledBatch, plan: StepPlan,
                    result: StepResult) -> list[Request]:
        """Route one step's results to its requests."""
        touched = []
        tokens = result.tokens.tolist()
        logprob = result.logprob.tolist()
        sample = plan.sample.tolist()
        accepted = self.structured.consume(batch, plan, tokens, sample)
        row_starts = plan.row_starts()
        for row, (r, n) in enumerate(batch.rows):
            if r.finished:  # ended (stop, abort) after this step was launched
                continue
            if r.prompt_logprobs is not None:
                start, offset = int(plan.seq_lens[row]) - n, int(row_starts[row])
                for j in range(n if start < len(r.prompt_ids) else 0):
                    t = offset + j
                    r.add_prompt_logprobs(start + j + 1, float(result.prompt_logprob[t]),
                                          int(result.prompt_rank[t]),
                                          result.prompt_top_logprobs[t], result.prompt_top_ids[t])
            if sample[row] and not appends_sample(r, plan, row):
                r.constraint.forced_positions.discard(int(plan.seq_lens[row]))  # forced there
            elif sample[row]:
                if r.logprobs is None:
                    r.append_token(tokens[row], self.max_model_len, logprob[row],
                                   accepted=accepted.get(r.request_id))
                    self.structured.fast_forward(r, self.max_model_len)
                else:
                    r.append_token(tokens[row], self.max_model_len, logprob[row],
                                   int(result.rank[row]), result.top_logprobs[row],
                                   result.top_ids[row], accepted=accepted.get(r.request_id))
            if r.status is RequestStatus.RUNNING:
                self.blocks.commit(r)  # full pages enter the prefix cache once computed
            if r.finish_reason is not None:
                self.scheduler.finish(r)
                self.requests.pop(r.request_id, None)
            touched.append(r)
        return touched

    def stats(self) -> EngineStats:
        return EngineStats(pool=self.pool.stats(),
                           prefix_cache=self.prefix_cache.stats() if self.prefix_cache else None,
                           compilations=self.runner.compilations,
                           compile_seconds=self.runner.compile_seconds,
                           preemptions=self.scheduler.num_preemptions, steps=self.num_steps,
                           waiting=len(self.scheduler.waiting),
                           running=len(self.scheduler.running), config=self.cfg,
                           attention_backend=self.runner.attention_backend)
