"""Engine: turns scheduled batches into StepPlans, runs them, and routes results to requests."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
import weakref
from concurrent.futures import Future

import jax
import numpy as np

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import KVCache
from dendrite_jax.cache.pool import PagePool, PoolStats
from dendrite_jax.cache.prefix_cache import PrefixCache, PrefixCacheStats
from dendrite_jax.config import EngineConfig
from dendrite_jax.engine.buckets import all_shapes, decode_rows_floor
from dendrite_jax.engine.kv_blocks import KVBlockManager
from dendrite_jax.engine.launcher import Launcher
from dendrite_jax.engine.page_table import HostPageTable
from dendrite_jax.engine.plan_builder import PlanBuilder, sampling_fields
from dendrite_jax.engine.request import Request, RequestStatus
from dendrite_jax.engine.runner import ModelRunner, splittable, to_host
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.scheduler import ScheduledBatch, Scheduler
from dendrite_jax.engine.step_output import StepResult
from dendrite_jax.engine.step_plan import StepPlan, StepShape
from dendrite_jax.grammar import GrammarCompiler, GrammarError
from dendrite_jax.grammar.automaton import AutomatonArena, AutomatonCursor
from dendrite_jax.grammar.device_automaton import FROM_SLOT, NO_AUTOMATON
from dendrite_jax.model.calibration import calibration_ids
from dendrite_jax.model.loader import LoadedModel
from dendrite_jax.quant import fp8
from dendrite_jax.validation import ParamError, is_int

THREADED_MIN_ROWS = 16  # see `Engine.threads`


def default_decode_burst(platform: str) -> int:
    """Decode steps per launch when every request decodes freely (`EngineConfig.decode_burst`).

    4 on accelerators: there a small model's step is about as long as the host's work for it
    (planning, the executable launch, applying the tokens), and hosts differ; a burst pays the
    host once for four tokens. It helps most on slow hosts and costs nothing where the device
    bounds the step. 1 on a CPU, where the model's step is far
    longer than the host's work.
    """
    return 1 if platform == "cpu" else 4


def _result(x):
    """A launch's output: the value itself, or what its future holds (launcher calls)."""
    return x.result() if isinstance(x, Future) else x


def default_num_pages(model: LoadedModel, cfg: EngineConfig, max_model_len: int) -> int:
    """Enough pages for every slot at full length, capped by the kv_cache_bytes budget."""
    per_page = (KVCache.bytes_per_page(model.config, cfg.page_size, cfg.dtype)
                if cfg.kv_compression == "none" else
                CompressedKVCache.bytes_per_page(model.config, cfg.page_size, cfg.kv_compression))
    full = cfg.max_num_seqs * math.ceil(max_model_len / cfg.page_size)
    return max(2, min(full, cfg.kv_cache_bytes // per_page))


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


class Engine:
    def __init__(self, model: LoadedModel, cfg: EngineConfig, attention_backend: str, *,
                 enable_prefix_caching: bool = False, mesh=None) -> None:
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
        self.blocks = KVBlockManager(self.pool, cfg.page_size, self.prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model.config, model.params, num_pages=num_pages,
                                  page_size=cfg.page_size, num_slots=cfg.max_num_seqs,
                                  dtype=cfg.dtype, attention_backend=attention_backend,
                                  kv_compression=cfg.kv_compression,
                                  calibration=None if cfg.kv_compression == "none" else
                                  calibration_ids(model.tokenizer, model.config.vocab_size),
                                  mesh=mesh)
        # Every step's page tables have this full width: every backend reads only the pages
        # each row's context holds.
        self.max_pages_per_seq = math.ceil(self.max_model_len / cfg.page_size)
        self.platform = jax.devices()[0].platform
        self.min_decode_rows = decode_rows_floor(
            self.platform, fp8_kernel=fp8.multiplied_by(model.params, "pallas_gpu"))
        self.burst = cfg.decode_burst or default_decode_burst(self.platform)
        self.page_table = HostPageTable(cfg.max_num_seqs, self.max_pages_per_seq)
        self.plans = PlanBuilder(max_num_seqs=cfg.max_num_seqs,
                                 max_num_batched_tokens=cfg.max_num_batched_tokens,
                                 pages_per_seq=self.max_pages_per_seq,
                                 min_decode_rows=self.min_decode_rows)
        self.requests: dict[str, Request] = {}
        self.grammar: GrammarCompiler | None = None
        # Device automata (`EngineConfig.device_automata`): where each grammar sits in the
        # device's table, the requests using one, and why constraints kept their matchers.
        self.arena: AutomatonArena | None = None
        self._automaton_requests: weakref.WeakSet[Request] = weakref.WeakSet()
        self.automaton_reasons: collections.Counter[str] = collections.Counter()
        if self._uses_automata(mesh):
            vocabulary = self.grammar_compiler().vocabulary
            self.runner.enable_automata(cfg.automaton_states, vocabulary.token_bytes,
                                        vocabulary.end_tokens)
            self.arena = AutomatonArena(cfg.automaton_states)
        self._failed: list[Request] = []  # failed at admission, not yet returned by step()
        self.mask_fills: collections.deque[tuple[float, int]] = collections.deque(maxlen=10_000)
        # ^ (seconds, constrained rows) of each recent token-mask fill
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self.num_steps = 0
        self._in_flight: tuple[ScheduledBatch, StepPlan, object] | None = None
        # A constrained step planned (its forward launched, if it splits) but not sampled yet.
        self._ahead: tuple[ScheduledBatch, StepPlan, Future | None] | None = None
        self.launcher = Launcher()
        # Time step() spent on the host (planning, launching, applying) and blocked waiting
        # for the device's results: the overlap's effect shows as host work hidden in waits.
        self.host_seconds = 0.0  # includes launch_seconds
        self.wait_seconds = 0.0
        self.launch_seconds = 0.0  # inside runner.launch: transfer, dispatch

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
            self._compile_constraint(request)
        return request

    def grammar_compiler(self) -> GrammarCompiler:
        """The model's grammar compiler, built on first use (building it is not free)."""
        if self.model.tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer; this model has none")
        if self.grammar is None:
            self.grammar = GrammarCompiler(self.model.tokenizer, self.model.config.vocab_size)
        return self.grammar

    def _compile_constraint(self, request: Request) -> None:
        """Give a constrained request a cursor in its device automaton, where the device can
        step its constraint, else its llguidance matcher. A constraint llguidance rejects
        fails that request alone (finish_reason "error", llguidance's message in `error`)."""
        try:
            if self.arena is None or not self._place_automaton(request):
                request.matcher = self.grammar_compiler().matcher(request.params)
        except GrammarError as e:
            request.fail(str(e))

    def _uses_automata(self, mesh) -> bool:
        """Whether constraints may run as device automata (`EngineConfig.device_automata`):
        by default on accelerators, for models with a tokenizer, on one device."""
        wanted = self.cfg.device_automata
        if wanted is None:
            wanted = self.platform != "cpu" and mesh is None
        return bool(wanted) and self.model.tokenizer is not None

    def _place_automaton(self, request: Request) -> bool:
        """Give the request a cursor in its constraint's device automaton where it has one
        that fits the table; False where not (the reason is counted in `automaton_reasons`)."""
        automaton = self.grammar.automaton(request.params)
        if isinstance(automaton, str):
            self.automaton_reasons[automaton] += 1
            return False
        placed = self.arena.place(automaton, self._automata_in_use)
        if placed is None:
            self.automaton_reasons[f"no room: {automaton.dfa.num_states} states and "
                                   f"automaton_states={self.cfg.automaton_states}"] += 1
            return False
        base, new = placed
        if new:
            self.launcher.sync()  # no queued call may hold the table being replaced
            self.runner.write_automaton(base, automaton)
        request.automaton = AutomatonCursor(automaton, base)
        self._automaton_requests.add(request)
        return True

    def _automata_in_use(self) -> set[str]:
        return {r.automaton.automaton.key for r in self._automaton_requests if not r.finished}

    def add(self, request: Request) -> None:
        if not request.finished:
            self._fast_forward(request)  # what the constraint forces first
        if request.finished:  # failed at admission, or forced to its end: the next step says so
            self._failed.append(request)
            return
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def _fast_forward(self, request: Request) -> None:
        """Append what the request's constraint forces, where `forced_tokens` allows it."""
        if self.cfg.forced_tokens and request.may_fast_forward:
            request.fast_forward(self.max_model_len)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages. False if it is unknown or done."""
        request = self.requests.pop(request_id, None)
        if request is None or request.finished:
            return False
        self.scheduler.abort(request)
        return True

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or self._in_flight is not None
                or self._ahead is not None)

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
        start = time.perf_counter()
        touched, launched = self._failed, None
        self._failed = []
        if self._ahead is not None or (self._in_flight is not None
                                       and self._constrained_pending()):
            waited = self.wait_seconds
            touched += self._constrained_step()
            self.host_seconds += time.perf_counter() - start - (self.wait_seconds - waited)
            return touched
        batch = self._schedule()
        if batch.rows:
            plan = self.build_plan(batch)
            mask = self.token_mask(batch, plan)
            self.launcher.sync()  # a constrained step's calls may still be queued
            self.runner.copy_pages([s for s, _ in batch.copies], [d for _, d in batch.copies])
            launch_start = time.perf_counter()
            launched = (batch, plan, self.runner.launch(plan, mask))
            self.launch_seconds += time.perf_counter() - launch_start
            self._advance(batch, plan)
            self.num_steps += 1
        elif self._in_flight is None and not touched:
            raise RuntimeError("the scheduler found nothing to run although requests are waiting")
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            self.host_seconds += time.perf_counter() - start
            return touched
        batch, plan, out = previous
        waited = time.perf_counter()
        results = to_host(plan.shape, _result(out))
        wait = time.perf_counter() - waited
        touched = self._apply(batch, plan, results)
        self.wait_seconds += wait
        self.host_seconds += time.perf_counter() - start - wait
        return touched

    def _constrained_pending(self) -> bool:
        """Whether a constrained request has a token in flight: its next mask must wait."""
        return any(r.matcher is not None and r.num_pending for r in self.scheduler.running)

    def _constrained_step(self) -> list[Request]:
        """A step while a constrained row's next mask depends on the token in flight.

        Where `splits` says so, a step launches in two halves: its forward as soon as it is
        planned, then, once the step before it is applied (the matchers advanced) and its mask
        filled, its sampling with that mask. The next step is planned and its forward launched
        right behind that sampling, so the device runs the model while the host reads back,
        advances the matchers and fills the next mask. Steps that do not split launch whole
        once the step before is applied. The launcher (`engine.launcher`) makes the calls in
        order, from its worker thread for the steps `threads` selects (wide steps on
        accelerators, where a call costs the host about as long as a small model's step).
        """
        if self._ahead is None:
            self._ahead = self._schedule_ahead()
        waited = time.perf_counter()
        touched = self._apply_in_flight()  # the matchers take the tokens in flight
        self.wait_seconds += time.perf_counter() - waited
        if self._ahead is not None:
            self._launch_ahead()
            if self._constrained_pending():
                self._ahead = self._schedule_ahead()
        return touched

    def _schedule_ahead(self) -> tuple[ScheduledBatch, StepPlan, Future | None] | None:
        """Schedule and plan a step whose mask may still depend on the step in flight; launch
        its forward now if it splits."""
        batch = self.scheduler.schedule()
        if not batch.rows:
            return None
        plan = self.build_plan(batch)
        if batch.copies:
            self._launch(plan, self.runner.copy_pages, [s for s, _ in batch.copies],
                         [d for _, d in batch.copies])
        forward = (self._launch(plan, self.runner.launch_forward, plan)
                   if self.splits(plan.shape) else None)
        self._advance(batch, plan)
        self.num_steps += 1
        return batch, plan, forward

    def _launch_ahead(self) -> None:
        """Fill the planned step's mask and launch its sampling (or the whole step)."""
        (batch, plan, forward), self._ahead = self._ahead, None
        mask = self.token_mask(batch, plan)
        out = (self._launch(plan, self.runner.launch, plan, mask) if forward is None else
               self._launch(plan, self.runner.launch_sample, plan, forward, mask))
        self._in_flight = (batch, plan, out)

    def _launch(self, plan: StepPlan, fn, *args) -> Future:
        """`fn(*args)` for `plan`'s step through the launcher, in order; futures among the
        args are resolved first (the calls before have run by then). From its worker thread
        where `threads` says so."""
        def call():
            start = time.perf_counter()
            try:
                return fn(*(_result(a) for a in args))
            finally:
                self.launch_seconds += time.perf_counter() - start
        return self.launcher.submit(call, threaded=self.threads(plan.shape))

    def threads(self, shape: StepShape) -> bool:
        """Whether a constrained step's calls are made from the launcher's worker thread
        (`EngineConfig.threaded_launch`). By default on accelerators for steps of at least
        `THREADED_MIN_ROWS` rows: there the host's work per step (advancing many matchers,
        filling their masks, planning) outlasts the device's, and the thread overlaps it with
        the calls; with few rows the hand-offs cost more than the overlap gains."""
        if self.cfg.threaded_launch is not None:
            return self.cfg.threaded_launch
        return self.platform != "cpu" and shape.num_seqs >= THREADED_MIN_ROWS

    def splits(self, shape: StepShape) -> bool:
        """Whether a constrained step of this shape launches in two halves
        (`EngineConfig.split_constrained_steps`, off by default). Split steps compile two more
        programs per step shape at warm-up, and the constraints that decode at length on
        accelerators (regular ones) run as device automata, which need no host mask to
        overlap. Mixed steps split only with `forced_tokens`, whose multi-token rows make most
        constrained steps mixed."""
        if not self.cfg.split_constrained_steps or not splittable(shape):
            return False
        return shape.decode_only or self.cfg.forced_tokens

    def drain(self) -> list[Request]:
        """Apply the step in flight and finish a step already planned (its forward may be
        running), launching nothing new."""
        touched = self._apply_in_flight()
        if self._ahead is not None:
            self._launch_ahead()
            touched += self._apply_in_flight()
        self.launcher.sync()
        return list({r.request_id: r for r in touched}.values())

    def _apply_in_flight(self) -> list[Request]:
        previous, self._in_flight = self._in_flight, None
        if previous is None:
            return []
        batch, plan, out = previous
        return self._apply(batch, plan, to_host(plan.shape, _result(out)))

    def _schedule(self) -> ScheduledBatch:
        """A burst of `self.burst` decode steps where the running requests allow one, else
        the scheduler's next step."""
        if self.burst > 1:
            batch = self.scheduler.schedule_burst(self.burst)
            if batch is not None:
                return batch
        return self.scheduler.schedule()

    def _advance(self, batch: ScheduledBatch, plan: StepPlan) -> None:
        """Host bookkeeping at launch: tokens are computed, samples are pending."""
        for row, (r, n) in enumerate(batch.rows):  # plan row i is the batch's i-th row
            r.num_computed += n * batch.steps
            if plan.sample[row]:
                r.add_pending(batch.steps)

    def warmup(self, shapes: list[StepShape] | None = None, freeze: bool = True) -> int:
        """Compile every shape the scheduler can produce (and the split steps constrained
        decoding uses, where they are on), in parallel; afterwards a new shape raises. With
        `shapes`, compile those and keep compiling on demand unless `freeze`. Returns the
        number of step shapes."""
        if shapes is None:
            shapes = self.step_shapes()
        self.runner.warmup(shapes, split=self.splits if self.model.tokenizer is not None
                           else lambda shape: False, freeze=freeze)
        return len(shapes)

    def step_shapes(self) -> list[StepShape]:
        """Every step shape this engine's scheduler can produce."""
        return all_shapes(max_num_seqs=self.cfg.max_num_seqs,
                          max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                          pages_per_seq=self.max_pages_per_seq,
                          min_decode_rows=self.min_decode_rows, burst=self.burst)

    def shapes_for(self, prompt_len: int, params: SamplingParams) -> list[StepShape]:
        """The shapes one request alone on the engine runs through: its prompt's chunks, then
        its decode steps (and bursts). A one-shot run compiles just these, in parallel."""
        budget = self.cfg.max_num_batched_tokens
        sort, prompt_lp = params.needs_sort, params.prompt_logprobs is not None
        shapes = {self.plans.shape([n], prompt_logprobs=prompt_lp, needs_sort=sort)
                  for n in {min(budget, prompt_len), prompt_len % budget or budget}}
        shapes.add(self.plans.shape([1], needs_sort=sort))
        if self.burst > 1 and not sort and not params.constrained:
            shapes.add(self.plans.shape([1], burst=self.burst))
        return sorted(shapes)

    def build_plan(self, batch: ScheduledBatch) -> StepPlan:
        """The step's host arrays (`PlanBuilder`). Row i is the batch's i-th row; a pending
        token (launched, not read back) is PENDING == FROM_LAST_TOKEN: the device reads it
        from the slot's last-token buffer."""
        reqs = [r for r, _ in batch.rows]
        q_lens = [n for _, n in batch.rows]
        wants_prompt_lp = any(r.prompt_logprobs is not None and r.num_computed < len(r.prompt_ids)
                              for r in reqs)
        shape = self.plans.shape(q_lens, prompt_logprobs=wants_prompt_lp,
                                 needs_sort=any(r.params.needs_sort for r in reqs),
                                 burst=batch.steps)
        inputs = [r.tokens[r.num_computed:r.num_computed + n] if n > 1
                  else [r.token_at(r.num_computed)] for r, n in batch.rows]
        targets = None
        if wants_prompt_lp:
            targets = [[r.prompt_ids[p + 1] if p + 1 < len(r.prompt_ids) else 0
                        for p in range(r.num_computed, r.num_computed + n)]
                       for r, n in batch.rows]
        slots = [r.slot for r in reqs]
        for r in reqs:
            self.page_table.sync(r)
        seq_lens = [r.num_computed + n for r, n in batch.rows]
        columns = dict(seq_lens=seq_lens, slot_ids=slots,
                       prompt_lens=[len(r.prompt_ids) for r in reqs],
                       sample=[s == r.num_tokens for s, r in zip(seq_lens, reqs, strict=True)],
                       reset=[r.new_in_slot for r in reqs],
                       **sampling_fields([r.sampling_columns for r in reqs]))
        if self.arena is not None:
            # A row whose input is still on device takes the state its slot's sample left.
            columns["automaton_state"] = [
                NO_AUTOMATON if r.automaton is None else
                FROM_SLOT if r.num_pending else r.automaton.device_state for r in reqs]
        for r in reqs:
            r.new_in_slot = False
        return self.plans.build(shape, inputs, self.page_table.rows(slots, shape.pages_per_seq),
                                columns, targets)

    def token_mask(self, batch: ScheduledBatch, plan: StepPlan) -> np.ndarray | None:
        """The step's token mask [S, words] if a constrained row samples, else None (all
        allowed). Rows follow the plan's rows, so mixed batches cannot misalign."""
        rows = [(r.matcher, row) for row, (r, _) in enumerate(batch.rows)
                if r.matcher is not None and not r.finished and plan.sample[row]
                and int(plan.seq_lens[row]) not in r.forced_positions]
        if not rows:
            return None
        start = time.perf_counter()
        mask = self.grammar.mask(plan.shape.num_seqs, rows)
        self.mask_fills.append((time.perf_counter() - start, len(rows)))
        return mask

    def _apply(self, batch: ScheduledBatch, plan: StepPlan,
               results: list[StepResult]) -> list[Request]:
        """Route a finished launch's results (one per step of a burst) to its requests,
        which were advanced at launch. Each request is listed once."""
        touched: dict[str, Request] = {}
        for result in results:
            for r in self._apply_step(batch, plan, result):
                touched[r.request_id] = r
        return list(touched.values())

    def _apply_step(self, batch: ScheduledBatch, plan: StepPlan,
                    result: StepResult) -> list[Request]:
        """Route one step's results to its requests."""
        touched = []
        tokens = result.tokens.tolist()
        logprob = result.logprob.tolist()
        sample = plan.sample.tolist()
        accepted = self._consume_sampled(batch, plan, tokens, sample)
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
            if sample[row] and not self._appends_sample(r, plan, row):
                r.forced_positions.discard(int(plan.seq_lens[row]))  # a forced token is there
            elif sample[row]:
                if r.logprobs is None:
                    r.append_token(tokens[row], self.max_model_len, logprob[row],
                                   accepted=accepted.get(r.request_id))
                    self._fast_forward(r)
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

    def _consume_sampled(self, batch: ScheduledBatch, plan: StepPlan, tokens: list[int],
                         sample: list[int]) -> dict[str, bool]:
        """Advance the matchers of a step's constrained rows by their sampled tokens all at
        once (llguidance's parallel consume: one by one, a large batch's matchers take much of
        the host's step). Returns request id -> accepted, for `Request.append_token`; rows it
        leaves out (stop tokens, forced positions, finished requests) append as before."""
        pairs, ids = [], []
        for row, (r, _) in enumerate(batch.rows):
            if (r.matcher is not None and sample[row] and not r.finished
                    and self._appends_sample(r, plan, row)
                    and tokens[row] not in r.stop_token_ids):  # a stop token is not consumed
                pairs.append((r.matcher, tokens[row]))
                ids.append(r.request_id)
        if len(pairs) < 2:
            return {}
        return dict(zip(ids, self.grammar.consume(pairs), strict=True))

    @staticmethod
    def _appends_sample(r: Request, plan: StepPlan, row: int) -> bool:
        """Whether the token a sampling row drew is appended to `r`: not where a forced token
        already sits (`forced_tokens`), whose draw is dropped."""
        return int(plan.seq_lens[row]) not in r.forced_positions

    def stats(self) -> EngineStats:
        return EngineStats(pool=self.pool.stats(),
                           prefix_cache=self.prefix_cache.stats() if self.prefix_cache else None,
                           compilations=self.runner.compilations,
                           compile_seconds=self.runner.compile_seconds,
                           preemptions=self.scheduler.num_preemptions, steps=self.num_steps,
                           waiting=len(self.scheduler.waiting),
                           running=len(self.scheduler.running))
