"""ModelRunner: device state (params, KV pages, per-slot state) and one compiled step per shape.

Steps are compiled ahead of time (`jit(...).lower(...).compile()`) per `StepShape`, so the
runner knows exactly how many compilations serving has caused; `warmup` compiles a whole set on
a thread pool (XLA compiles outside the GIL) and then refuses new ones; on accelerators a second
start loads them from disk (`program_cache`). The KV cache and the
per-slot state are donated to every step and replaced by the step's outputs. A shape can also
compile as a split step (a forward executable, then a sampling one), which constrained
decoding may use to fill its token mask while the forward runs. With device automata
(`enable_automata`) the steps also read the automaton table, which `write_automaton` fills once
per grammar.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import KVCache, copy_pages
from dendrite_jax.config import ModelConfig
from dendrite_jax.engine import step_output
from dendrite_jax.engine.buckets import longest_first
from dendrite_jax.engine.logit_bias import LogitBias, LogitBiasTable
from dendrite_jax.engine.program_cache import ProgramCache, default_program_cache
from dendrite_jax.engine.step import SlotState, forward_step, sample_step, step
from dendrite_jax.engine.step_output import StepResult
from dendrite_jax.engine.step_plan import StepPlan, StepShape, buffer_size
from dendrite_jax.grammar.automaton import TokenAutomaton, write_automaton
from dendrite_jax.grammar.device_automaton import (
    FILL_ROWS,
    PAD_BYTE,
    AutomatonTables,
    Vocabulary,
    fill_token_table,
)
from dendrite_jax.grammar.mask import allow_all, mask_words
from dendrite_jax.model.calibration import kv_fp8_calibration, kv_means
from dendrite_jax.model.params import Params
from dendrite_jax.model.tensor_parallel import kv_sharding
from dendrite_jax.progress import Progress
from kernels_pallas import kv_compress
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE
from kernels_pallas.paged_attention.tail import FullPrecisionTail


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (a user cache directory by default), so a
    second process reuses compiled steps. Respects a directory the user already configured."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        directory = str(Path(base) / "dendrite_jax" / "xla")
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class RecompileError(RuntimeError):
    """A step shape that warm-up did not compile was requested while serving."""


def memory_map_pressure() -> float | None:
    """This process's memory mappings as a fraction of the kernel's limit (Linux), else None.

    Each executable XLA compiles for the CPU maps hundreds of regions,
    and JAX's caches keep them alive, so a process can run out of mappings long before memory.
    """
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            count = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return count / limit


MAP_PRESSURE_LIMIT = 0.7

# Executables per bucket: the whole step, or its two halves (`splittable` shapes only).
STEP, FORWARD, SAMPLE = "step", "forward", "sample"


def splittable(shape: StepShape) -> bool:
    """Buckets that also compile as a split step: single steps (decode-only or mixed) without
    prompt logprobs."""
    return not shape.prompt_logprobs and shape.burst == 1


class ModelRunner:
    """Runs StepPlans on the device. Not thread-safe: one step at a time."""

    def __init__(self, cfg: ModelConfig, params: Params, *, num_pages: int, page_size: int,
                 num_slots: int, dtype: str, attention_backend: str = "reference",
                 kv_compression: str = "none", calibration: list[int] | None = None,
                 full_precision_window: int = 0, mesh: Mesh | None = None,
                 compiler_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.params = params
        self.attention_backend = attention_backend
        self.compiler_options = dict(compiler_options or {})  # XLA options of every step
        # With a tensor-parallel mesh (`model.tensor_parallel`), params arrive placed; the cache is
        # split on its KV heads and everything else the step reads is replicated.
        self.mesh = mesh
        self._replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        if mesh is not None and kv_compression != "none":
            raise ValueError("kv_compression with tensor_parallel_size > 1 is not supported yet")
        tail = None
        if full_precision_window:  # each slot's sink and recent tokens, in `dtype`
            tail = FullPrecisionTail.create(cfg.num_layers, num_slots, full_precision_window,
                                            cfg.num_kv_heads, cfg.head_dim, dtype)
        if kv_compression == "none":
            if tail is not None:
                raise ValueError("a full-precision tail is for a compressed KV cache")
            self.kv = KVCache.create(cfg, num_pages, page_size, dtype)
            if mesh is not None:
                self.kv = jax.device_put(self.kv, kv_sharding(mesh))
        elif kv_compression == "fp8":  # means and scales from the calibration tokens
            if not calibration:
                raise ValueError("kv_compression='fp8' needs calibration token ids "
                                 "(`model.calibration.calibration_ids`)")
            self.kv = KVCache.create(cfg, num_pages, page_size, FP8_DTYPE,
                                     fp8=kv_fp8_calibration(params, cfg, calibration), tail=tail)
        else:
            kv_compress.resolve_backend(attention_backend, kv_compression, cfg.head_dim)
            # Means over the calibration tokens centre what the cache encodes.
            means = kv_means(params, cfg, calibration) if calibration else None
            self.kv = CompressedKVCache.create(cfg, num_pages, page_size, kv_compression,
                                               means=means, tail=tail)
        self.slots = jax.device_put(SlotState.create(num_slots, cfg.vocab_size),
                                    self._replicated)
        self.logit_bias = LogitBiasTable(num_slots, cfg.vocab_size,
                                         lambda t: jax.device_put(t, self._replicated))
        static = ("cfg", "shape", "attention_backend")
        # On a mesh the outputs' shardings are fixed to the inputs' (outputs feed the next
        # step): left to XLA, the vocabulary-split logits can leave the slots' token counts
        # split too, and the next call then refuses them.
        outs = {STEP: {}, FORWARD: {}, SAMPLE: {}}
        if mesh is not None:
            rep, heads = self._replicated, kv_sharding(mesh)
            outs = {STEP: dict(out_shardings=(rep, heads, rep)),
                    FORWARD: dict(out_shardings=(rep, heads, rep)),
                    SAMPLE: dict(out_shardings=(rep, rep))}
        self._jitted = {
            STEP: jax.jit(step, static_argnames=static, donate_argnames=("kv", "slots"),
                          **outs[STEP]),
            FORWARD: jax.jit(forward_step, static_argnames=static,
                             donate_argnames=("kv", "slots"), **outs[FORWARD]),
            SAMPLE: jax.jit(sample_step, static_argnames=("shape",), donate_argnames=("slots",),
                            **outs[SAMPLE]),
        }
        # Device automata (`enable_automata`): the table steps read, and how it is written.
        self.automata: AutomatonTables | None = None
        self._vocabulary: Vocabulary | None = None
        self._fill = jax.jit(fill_token_table, donate_argnames=("tables",))
        self._compiled: collections.OrderedDict[tuple[StepShape, str], Any] = (
            collections.OrderedDict())
        # (shape, seconds) per compilation, loads from the persistent cache included.
        self.compile_log: list[tuple[StepShape, float]] = []
        self._log_lock = threading.Lock()
        # Compiled programs on disk (on accelerators, beside JAX's persistent cache where one is
        # configured): a second start loads them without tracing.
        self.programs: ProgramCache | None = default_program_cache()
        self.loaded_programs = 0  # of compile_log's entries, those loaded from `programs`
        self.frozen = False  # after warm-up: compiling a new shape raises RecompileError
        self._allow_all: dict[int, jax.Array] = {}  # rows -> all-ones token mask on device

    @property
    def compilations(self) -> int:
        return len(self._compiled)

    @property
    def compiled_shapes(self) -> list[StepShape]:
        return sorted({shape for shape, _ in self._compiled})

    def compile(self, shape: StepShape, kind: str = STEP) -> Any:
        """Compile the step (or one half of the split step) for `shape` (idempotent)."""
        key = (shape, kind)
        if key in self._compiled:
            self._compiled.move_to_end(key)
        else:
            if self.frozen:
                raise RecompileError(f"step shape {shape} ({kind}) was not compiled at warm-up")
            self._relieve_map_pressure()
            self._compiled[key] = self._build(shape, kind)
        return self._compiled[key]

    def _build(self, shape: StepShape, kind: str) -> Any:
        """Lower and compile one program (thread-safe: XLA compiles outside the GIL)."""
        if kind != STEP and not splittable(shape):
            raise ValueError(f"step shape {shape} has no split step")
        start = time.perf_counter()
        rep = dict(sharding=self._replicated) if self.mesh is not None else {}
        buffer = jax.ShapeDtypeStruct((buffer_size(shape),), jnp.int32, **rep)
        mask = jax.ShapeDtypeStruct((shape.num_seqs, mask_words(self.cfg.vocab_size)),
                                    jnp.int32, **rep)
        logits = jax.ShapeDtypeStruct((shape.num_seqs, self.cfg.vocab_size), jnp.float32,
                                      **rep)
        model = (self.params, self.kv, self.slots, buffer)
        bias = self.logit_bias.device()
        args = {STEP: (*model, mask, self.automata, bias), FORWARD: model,
                SAMPLE: (logits, self.slots, buffer, mask, self.automata, bias)}[kind]
        statics = dict(shape=shape) if kind == SAMPLE else dict(
            cfg=self.cfg, shape=shape, attention_backend=self.attention_backend)

        def compile_program():
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                return self._jitted[kind].lower(*args, **statics).compile(
                    compiler_options=self.compiler_options or None)

        if self.programs is None:
            compiled, loaded = compile_program(), False
        else:
            compiled, loaded = self.programs.load_or_compile(
                self.programs.key(args, {**statics, "xla": self.compiler_options}, kind),
                compile_program)
        with self._log_lock:
            self.compile_log.append((shape, time.perf_counter() - start))
            self.loaded_programs += loaded
        return compiled

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling programs (summed over threads; cache loads included)."""
        return sum(seconds for _, seconds in self.compile_log)

    def memory_analysis(self) -> dict[tuple[StepShape, str], Any]:
        """Each compiled program's `memory_analysis()` (None where the backend gives none)."""
        return {key: compiled.memory_analysis() for key, compiled in self._compiled.items()}

    def _relieve_map_pressure(self) -> None:
        """Before compiling: if the process nears its memory-mapping limit, drop the least
        recently used half of the compiled steps and JAX's caches (which hold them too)."""
        pressure = memory_map_pressure()
        if pressure is None or pressure < MAP_PRESSURE_LIMIT or len(self._compiled) < 2:
            return
        for _ in range(len(self._compiled) // 2):
            self._compiled.popitem(last=False)
        jax.clear_caches()

    def warmup(self, shapes: list[StepShape], *,
               split: Callable[[StepShape], bool] = lambda shape: False,
               threads: int | None = None, freeze: bool = True) -> None:
        """Compile every shape (and the split step of each one `split` selects) ahead of time
        on a pool of `threads` (default: the machine's cores), then (with `freeze`) refuse to
        compile anything else. The longest programs start first (`buckets.longest_first`). A
        progress line shows on stderr when this takes more than a few seconds."""
        work = [(shape, kind) for shape in longest_first(shapes)
                for kind in ((STEP, FORWARD, SAMPLE) if split(shape) else (STEP,))
                if (shape, kind) not in self._compiled]
        progress = Progress("warm-up: compiling step programs", len(work))
        threads = threads or os.cpu_count() or 1
        self._check_map_pressure(0, len(work))
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            futures = {pool.submit(self._build, *key): key for key in work}
            for i, future in enumerate(concurrent.futures.as_completed(futures)):
                self._compiled[futures[future]] = future.result()
                progress.update(i + 1)
                self._check_map_pressure(i + 1, len(work))
        progress.close()
        self.frozen = freeze

    def _check_map_pressure(self, done: int, total: int) -> None:
        pressure = memory_map_pressure()
        if pressure is not None and pressure > MAP_PRESSURE_LIMIT:
            # Programs of engines no longer in use may live on in JAX's caches only.
            gc.collect()
            jax.clear_caches()
            pressure = memory_map_pressure()
        if pressure is not None and pressure > MAP_PRESSURE_LIMIT:
            raise RuntimeError(
                f"warm-up compiled {done} of {total} step programs and this process is at "
                f"{pressure:.0%} of its memory-mapping limit (vm.max_map_count); lower "
                "max_num_seqs, max_num_batched_tokens or max_model_len, or use warmup=False")

    def launch(self, plan: StepPlan, token_mask: np.ndarray | None = None) -> jax.Array:
        """Start a step and return its packed outputs on device, without waiting for them.
        Without a token mask (no constrained row) every token is allowed, and nothing is
        uploaded for the mask: an all-ones device array per row count is kept."""
        compiled = self.compile(plan.shape)
        buffer = self._host_input(plan.pack())
        mask = self._device_mask(plan.shape.num_seqs, token_mask)
        out, self.kv, self.slots = compiled(self.params, self.kv, self.slots, buffer, mask,
                                            self.automata, self._bias(plan))
        out.copy_to_host_async()
        return out

    def launch_forward(self, plan: StepPlan) -> tuple[jax.Array, jax.Array]:
        """Start the model half of a split step; returns what `launch_sample` takes."""
        compiled = self.compile(plan.shape, FORWARD)
        # Placed once: the sampling half reads the same plan (at 32 rows of the 1B shape's
        # full-context page tables, 1 MB that a numpy argument would upload twice).
        buffer = jax.device_put(plan.pack(), self._replicated)
        logits, self.kv, self.slots = compiled(self.params, self.kv, self.slots, buffer)
        return logits, buffer

    def launch_sample(self, plan: StepPlan, forward: tuple[jax.Array, jax.Array],
                      token_mask: np.ndarray | None = None) -> jax.Array:
        """Finish a split step started by `launch_forward`: the same outputs as `launch`."""
        compiled = self.compile(plan.shape, SAMPLE)
        logits, buffer = forward
        out, self.slots = compiled(logits, self.slots, buffer,
                                   self._device_mask(plan.shape.num_seqs, token_mask),
                                   self.automata, self._bias(plan))
        out.copy_to_host_async()
        return out

    def _bias(self, plan: StepPlan) -> LogitBias:
        """The logit-bias table `plan` was planned with (the current one if it names none)."""
        return plan.logit_bias if plan.logit_bias is not None else self.logit_bias.device()

    def _host_input(self, array: np.ndarray) -> np.ndarray | jax.Array:
        """A step's host input read by one executable call, as the call takes it. On one
        device the numpy array goes into the call as it is and the executable copies it in
        C++, which costs the host less than a `jax.device_put` first.
        On a mesh it is placed replicated first. (An input two calls read, the
        split step's plan, is placed once instead: `launch_forward`.)"""
        return array if self.mesh is None else jax.device_put(array, self._replicated)

    def _device_mask(self, rows: int, token_mask: np.ndarray | None) -> np.ndarray | jax.Array:
        if token_mask is not None:
            return self._host_input(token_mask)
        if rows not in self._allow_all:
            self._allow_all[rows] = jax.device_put(allow_all(rows, self.cfg.vocab_size),
                                                   self._replicated)
        return self._allow_all[rows]

    def enable_automata(self, capacity: int, token_bytes: list[bytes],
                        end_tokens: frozenset[int]) -> None:
        """Give the steps a table of `capacity` automaton states (before warm-up: the steps
        compile with it). Compiles the table's writer now, with a write of nothing."""
        if self.mesh is not None:
            raise ValueError("device automata with tensor_parallel_size > 1 are not supported")
        self.automata = AutomatonTables.create(capacity, self.cfg.vocab_size, end_tokens)
        self._vocabulary = Vocabulary.create(token_bytes)
        self.automata = self._fill(self.automata, self._vocabulary,
                                   np.zeros((capacity, PAD_BYTE + 1), np.int32),
                                   np.zeros(capacity, bool), np.full(FILL_ROWS, -1, np.int32),
                                   np.full(FILL_ROWS, -1, np.int32), np.int32(0))

    def write_automaton(self, base: int, automaton: TokenAutomaton) -> None:
        """Walk the vocabulary from every state of `automaton` into the table at `base`
        (asynchronously: the steps after it read the new rows)."""
        self.automata = write_automaton(self.automata, self._vocabulary, self._fill, automaton,
                                        base)

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Device half of copy-on-write: duplicate pages src[i] into dst[i]."""
        if src:
            src, dst = (jax.device_put(np.asarray(x, np.int32), self._replicated) for x in (src, dst))
            self.kv = copy_pages(self.kv, src, dst)


def to_host(shape: StepShape, out: jax.Array) -> list[StepResult]:
    """Wait for a launch and bring its outputs to the host: one StepResult per step (several
    for a burst)."""
    return step_output.unpack_burst(shape, np.asarray(out))
