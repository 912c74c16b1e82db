"""Engine: turns scheduled batches into StepPlans, runs them, and routes results to requests."""

from __future__ import annotations

import math

import numpy as np

from dendrite_jax.cache.kv import KVCache
from dendrite_jax.cache.pool import PagePool
from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.buckets import bucket_shape
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


class Engine:
    def __init__(self, model: LoadedModel, cfg: EngineConfig, attention_backend: str) -> None:
        self.model = model
        self.cfg = cfg
        context = model.config.max_position_embeddings
        if cfg.max_model_len is not None and cfg.max_model_len > context:
            raise ValueError(f"max_model_len ({cfg.max_model_len}) exceeds the model's context "
                             f"({context})")
        self.max_model_len = cfg.max_model_len or context
        num_pages = cfg.num_pages or default_num_pages(model, cfg, self.max_model_len)
        self.pool = PagePool(num_pages)
        self.scheduler = Scheduler(self.pool, page_size=cfg.page_size,
                                   max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model.config, model.params, num_pages=num_pages,
                                  page_size=cfg.page_size, num_slots=cfg.max_num_seqs,
                                  dtype=cfg.dtype, attention_backend=attention_backend)
        self.max_pages_per_seq = math.ceil(self.max_model_len / cfg.page_size)
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0

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
        needed = self.scheduler.pages_needed(request)
        if needed > self.pool.num_pages - self.pool.headroom:
            raise ValueError(f"request needs {needed} KV pages (prompt {n} + max_tokens "
                             f"{params.max_tokens} tokens) but the cache has "
                             f"{self.pool.num_pages - self.pool.headroom}; raise num_pages or "
                             "lower max_tokens")
        self._next_id += 1
        return request

    def add(self, request: Request) -> None:
        self.scheduler.add(request)

    def abort(self, request: Request) -> None:
        if request.finish_reason is None:
            request.finish_reason = "abort"
        self.scheduler.abort(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----------------------------------------------------------------------------- steps

    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it."""
        batch = self.scheduler.schedule()
        plan = self.build_plan(batch)
        result = self.runner.execute(plan)
        return self._apply(batch, plan, result)

    def build_plan(self, batch: ScheduledBatch) -> StepPlan:
        ps = self.cfg.page_size
        wants_prompt_lp = any(r.in_prefill and r.params.prompt_logprobs is not None
                              for r in batch.requests)
        shape = bucket_shape(
            batch.num_new_tokens,
            [math.ceil((r.num_computed + n) / ps) for r, n in zip(
                batch.requests, batch.num_new_tokens, strict=True)],
            max_num_seqs=self.cfg.max_num_seqs, max_pages_per_seq=self.max_pages_per_seq,
            prompt_logprobs=wants_prompt_lp)
        plan = StepPlan.empty(shape)
        offset = 0
        for i, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
            start, prompt_len = r.num_computed, len(r.prompt_ids)
            positions = range(start, start + n)
            plan.input_ids[offset:offset + n] = [r.token_at(p) for p in positions]
            if wants_prompt_lp:
                plan.targets[offset:offset + n] = [
                    r.prompt_ids[p + 1] if p + 1 < prompt_len else 0 for p in positions]
            offset += n
            plan.cu_q_lens[i + 1:] = offset
            plan.seq_lens[i] = start + n
            pages = r.pages[:shape.pages_per_seq]
            plan.page_tables[i, :len(pages)] = pages
            plan.slot_ids[i] = r.slot
            plan.prompt_lens[i] = prompt_len
            plan.sample[i] = start + n >= prompt_len
            p = r.params
            plan.top_k[i] = p.top_k
            plan.seed[i] = np.uint32(r.seed).view(np.int32)
            plan.temperature[i] = p.temperature
            plan.top_p[i] = p.top_p
            plan.min_p[i] = p.min_p
            plan.repetition_penalty[i] = p.repetition_penalty
            plan.presence_penalty[i] = p.presence_penalty
            plan.frequency_penalty[i] = p.frequency_penalty
        return plan

    def _apply(self, batch: ScheduledBatch, plan: StepPlan, result: StepResult) -> list[Request]:
        finished = []
        offset = 0
        for i, (r, n) in enumerate(zip(batch.requests, batch.num_new_tokens, strict=True)):
            start = r.num_computed
            if r.prompt_logprobs is not None and r.in_prefill:
                rows = [offset + j for j in range(n) if start + j + 1 < len(r.prompt_ids)]
                r.add_prompt_logprobs([int(plan.targets[k]) for k in rows],
                                      result.prompt_logprob[rows], result.prompt_rank[rows],
                                      result.prompt_top_logprobs[rows],
                                      result.prompt_top_ids[rows])
            offset += n
            r.num_computed += n
            if plan.sample[i]:
                r.append_token(int(result.tokens[i]), float(result.logprob[i]),
                               int(result.rank[i]), result.top_logprobs[i], result.top_ids[i],
                               self.max_model_len)
            if r.finish_reason is not None:
                self.scheduler.finish(r)
                finished.append(r)
        return finished
