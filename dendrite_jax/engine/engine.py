"""Engine: turns scheduled batches into StepPlans, runs them, and routes results to requests."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dendrite_jax.cache.kv import KVCache
from dendrite_jax.cache.pool import PagePool, PoolStats
from dendrite_jax.cache.prefix_cache import PrefixCache, PrefixCacheStats
from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.buckets import all_shapes, bucket_shape
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.runner import ModelRunner, StepResult
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.scheduler import ScheduledBatch, Scheduler
from dendrite_jax.engine.step_plan import StepPlan
from dendrite_jax.model.loader import LoadedModel


def default_num_pages(model: LoadedModel, cfg: EngineConfig, max_model_len: int) -> int:
    """Enough pages for every slot at full length, capped by the kv_cache_bytes budget."""
    per_page = KVCache.bytes_per_page(model.config, cfg.page_size, cfg.dtype)
    full = cfg.max_num_seqs * math.ceil(max_model_len / cfg.page_size)
    return max(2, min(full, cfg.kv_cache_bytes // per_page))


@dataclasses.dataclass(frozen=True)
class EngineStats:
    pool: PoolStats
    prefix_cache: PrefixCacheStats | None
    compilations: int
    preemptions: int
    steps: int
    waiting: int
    running: int


class Engine:
    def __init__(self, model: LoadedModel, cfg: EngineConfig, attention_backend: str, *,
                 enable_prefix_caching: bool = False) -> None:
        self.model = model
        self.cfg = cfg
        context = model.config.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > context:
            raise ValueError(f"max_model_len ({cfg.max_model_len}) exceeds the model's context "
                             f"({context})")
        self.max_model_len = cfg.max_model_len or context
        num_pages = cfg.num_pages or default_num_pages(model, cfg, self.max_model_len)
        self.pool = PagePool(num_pages)
        self.prefix_cache = PrefixCache(self.pool, cfg.page_size) if enable_prefix_caching else None
        self.scheduler = Scheduler(self.pool, page_size=cfg.page_size,
                                   max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens,
                                   prefix_cache=self.prefix_cache)
        self.runner = ModelRunner(model.config, model.params, num_pages=num_pages,
                                  page_size=cfg.page_size, num_slots=cfg.max_num_seqs,
                                  dtype=cfg.dtype, attention_backend=attention_backend)
        self.max_pages_per_seq = math.ceil(self.max_model_len / cfg.page_size)
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self.num_steps = 0

    # ----------------------------------------------------------------------------- requests

    def make_request(self, prompt: str | None, prompt_ids: list[int],
                     params: SamplingParams) -> Request:
        """Validate a request at the boundary; raises ValueError naming the problem."""
        n, vocab = len(prompt_ids), self.model.config.vocab_size
        if n == 0:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not (isinstance(t, int | np.integer) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n:,} tokens; the model's context is "
                             f"{self.max_model_len:,} (max_model_len), which leaves no room to "
                             "generate")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        request = Request(str(self._next_id), prompt, [int(t) for t in prompt_ids], params,
                          seed % 2**32, self.max_model_len, self.model.tokenizer,
                          self.model.tokenizer.stop_token_ids if self.model.tokenizer else ())
        needed = self.scheduler.pages_for(request.max_len)
        capacity = self.pool.num_pages - self.pool.headroom
        if needed > capacity:
            raise ValueError(f"request needs {needed} KV pages (prompt {n} + max_tokens "
                             f"{params.max_tokens} tokens) but the cache has {capacity}; raise "
                             "num_pages or lower max_tokens")
        self._next_id += 1
        return request

    def add(self, request: Request) -> None:
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
        return self.scheduler.has_unfinished()

    # ----------------------------------------------------------------------------- steps

    def step(self) -> list[Request]:
        """Run one step; return the requests that produced output in it."""
        batch = self.scheduler.schedule()
        if not batch.rows:
            raise RuntimeError("the scheduler found nothing to run although requests are waiting")
        plan = self.build_plan(batch)
        src, dst = [s for s, _ in batch.copies], [d for _, d in batch.copies]
        self.runner.copy_pages(src, dst)
        result = self.runner.execute(plan)
        self.num_steps += 1
        return self._apply(batch, plan, result)

    def warmup(self) -> int:
        """Compile every bucket the scheduler can produce; afterwards a new shape raises."""
        shapes = all_shapes(max_num_seqs=self.cfg.max_num_seqs,
                            max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                            max_pages_per_seq=self.max_pages_per_seq)
        self.runner.warmup(shapes)
        return len(shapes)

    def build_plan(self, batch: ScheduledBatch) -> StepPlan:
        num_decode = batch.num_decode
        prefill_lens = [n for _, n in batch.rows[num_decode:]]
        wants_prompt_lp = any(r.prompt_logprobs is not None and r.num_computed < len(r.prompt_ids)
                              for r, _ in batch.rows)
        shape = bucket_shape(
            num_decode, prefill_lens,
            max(self.scheduler.pages_for(r.num_computed + n) for r, n in batch.rows),
            max_pages_per_seq=self.max_pages_per_seq, prompt_logprobs=wants_prompt_lp)
        plan = StepPlan.empty(shape)
        for i, (r, n) in enumerate(batch.rows):
            row = i if i < num_decode else shape.num_decode + (i - num_decode)
            start, prompt_len, offset = r.num_computed, len(r.prompt_ids), shape.row_start(row)
            positions = range(start, start + n)
            plan.input_ids[offset:offset + n] = [r.token_at(p) for p in positions]
            if wants_prompt_lp:
                plan.targets[offset:offset + n] = [
                    r.prompt_ids[p + 1] if p + 1 < prompt_len else 0 for p in positions]
            plan.q_lens[row] = n
            plan.seq_lens[row] = start + n
            pages = r.pages[:shape.pages_per_seq]
            plan.page_tables[row, :len(pages)] = pages
            plan.slot_ids[row] = r.slot
            plan.prompt_lens[row] = prompt_len
            plan.sample[row] = start + n == r.num_tokens
            p = r.params
            plan.top_k[row] = p.top_k
            plan.seed[row] = np.uint32(r.seed).view(np.int32)
            plan.temperature[row] = p.temperature
            plan.top_p[row] = p.top_p
            plan.min_p[row] = p.min_p
            plan.repetition_penalty[row] = p.repetition_penalty
            plan.presence_penalty[row] = p.presence_penalty
            plan.frequency_penalty[row] = p.frequency_penalty
        return plan

    def _apply(self, batch: ScheduledBatch, plan: StepPlan, result: StepResult) -> list[Request]:
        shape = plan.shape
        num_decode = batch.num_decode
        touched = []
        for i, (r, n) in enumerate(batch.rows):
            row = i if i < num_decode else shape.num_decode + (i - num_decode)
            start, offset = r.num_computed, shape.row_start(row)
            if r.prompt_logprobs is not None and start < len(r.prompt_ids):
                for j in range(n):
                    t = offset + j
                    r.add_prompt_logprobs(start + j + 1, float(result.prompt_logprob[t]),
                                          int(result.prompt_rank[t]),
                                          result.prompt_top_logprobs[t], result.prompt_top_ids[t])
            r.num_computed += n
            if plan.sample[row]:
                r.append_token(int(result.tokens[row]), float(result.logprob[row]),
                               int(result.rank[row]), result.top_logprobs[row],
                               result.top_ids[row], self.max_model_len)
            self._commit_full_pages(r)
            if r.finish_reason is not None:
                self.scheduler.finish(r)
                self.requests.pop(r.request_id, None)
            touched.append(r)
        return touched

    def _commit_full_pages(self, r: Request) -> None:
        """Full pages enter the prefix cache as soon as they are computed."""
        full = r.num_computed // self.cfg.page_size
        if self.prefix_cache is None or full <= r.num_cached_pages:
            return
        self.prefix_cache.commit(r.tokens[:full * self.cfg.page_size], r.pages[:full])
        r.num_cached_pages = full

    def stats(self) -> EngineStats:
        return EngineStats(pool=self.pool.stats(),
                           prefix_cache=self.prefix_cache.stats() if self.prefix_cache else None,
                           compilations=self.runner.compilations,
                           preemptions=self.scheduler.num_preemptions, steps=self.num_steps,
                           waiting=len(self.scheduler.waiting),
                           running=len(self.scheduler.running))
