"""Engine settings resolved once: every "auto" and unset default made concrete for a platform.

`EngineConfig` holds what the caller chose; `resolve` decides everything the caller left to
the platform, here and nowhere else, and the engine, runner and components read only the
result (`LLM.stats().config` reports it).
"""

from __future__ import annotations

import dataclasses

from dendrite_jax.cache.kv import PLAIN_KV
from dendrite_jax.config import EngineConfig
from dendrite_jax.model.params import resolve_layer_loop
from dendrite_jax.quant.fp8 import FOLD_NORMS, weight_scheme
from kernels_pallas import kv_compress
from kernels_pallas.fp8_matmul import resolve_backend as resolve_fp8_matmul
from kernels_pallas.paged_attention import resolve_backend as resolve_attention


def resolve(cfg: EngineConfig, platform: str, *, head_dim: int,
            on_mesh: bool = False) -> EngineConfig:
    """`cfg` with every platform default decided for `platform` ("cpu", "gpu", "tpu"), for a
    model of `head_dim` placed on a device mesh or not (`on_mesh`: tensor parallelism, or a
    replica given its devices). Raises ValueError for settings that cannot go together.

    - `attention_backend` "auto": the platform's Pallas kernel where it reads the cache
      (compressed caches: the codes it decodes), else the pure-JAX reference;
    - `layer_loop` "auto": a scan on CPUs (compiles about three times faster, runs as fast),
      unrolled elsewhere and wherever FP8 layers sit beside unquantized ones;
    - `fp8_matmul` "auto": the platform's Pallas kernel; `fp8_fold_norms`: for MXFP8 only
      (per-channel FP8 loses quality to it); without FP8 weights "reference" and None;
    - `warmup`: on accelerators (off on CPUs, where compiling on demand is cheaper);
    - `triton_gemms`: off (cuBLAS GEMMs compile in about half the time; see `EngineConfig`);
    - `decode_burst`: 4 on accelerators, where a small model's step is about as long as the
      host's work for it; 1 on a CPU, where the step far outlasts it;
    - `device_automata`: on accelerators on one device (on a CPU the host's masks cost the
      model no time; tensor-parallel and replica engines keep host matchers);
    - `split_constrained_steps`: off (two more programs per step shape);
    - `threaded_launch`: off on a CPU, where the thread would take a core from the model;
      elsewhere left unset: `LaunchPipeline.threads` decides per step by its rows;
    - `kv_full_precision_window`: 32 with an FP8 cache on the reference and GPU backends
      without prefix caching (`paged_attention.tail`), else 0 (caches of codes have it on
      those backends when asked).
    """
    accelerator = platform != "cpu"
    fp8 = cfg.weights_dtype is not None
    loop = resolve_layer_loop(cfg.layer_loop, platform, mixed_layers=bool(cfg.fp8_keep_layers))
    if cfg.fp8_keep_layers and loop == "scan":
        raise ValueError("fp8_keep_layers needs layer_loop='unrolled' (a scanned stack cannot "
                         "mix FP8 and unquantized layers)")
    if cfg.kv_compression in PLAIN_KV:  # pages of vectors: every backend reads them
        attention = resolve_attention(cfg.attention_backend, platform)
    else:
        attention = kv_compress.resolve_backend(cfg.attention_backend, cfg.kv_compression,
                                                head_dim, platform)
    if on_mesh and (fp8 or cfg.kv_compression != "none"):
        raise ValueError("an explicit device mesh (tensor_parallel_size > 1 or devices) does "
                         "not combine with weights_dtype or kv_compression yet")
    window = resolve_full_precision_window(cfg, attention)
    return dataclasses.replace(
        cfg,
        kv_full_precision_window=window,
        attention_backend=attention,
        layer_loop=loop,
        fp8_matmul=resolve_fp8_matmul(cfg.fp8_matmul, platform) if fp8 else "reference",
        fp8_fold_norms=(None if not fp8 else FOLD_NORMS[weight_scheme(cfg.weights_dtype)]
                        if cfg.fp8_fold_norms is None else cfg.fp8_fold_norms),
        warmup=accelerator if cfg.warmup is None else cfg.warmup,
        decode_burst=cfg.decode_burst or (4 if accelerator else 1),
        triton_gemms=bool(cfg.triton_gemms),
        device_automata=(accelerator and not on_mesh if cfg.device_automata is None
                         else cfg.device_automata),
        split_constrained_steps=bool(cfg.split_constrained_steps),
        threaded_launch=(False if cfg.threaded_launch is None and not accelerator
                         else cfg.threaded_launch))


DEFAULT_FULL_PRECISION_WINDOW = 32  # tokens; with the sink, what FP8 pages need for quality
TAIL_BACKENDS = ("reference", "pallas_gpu")  # attention backends with a full-precision tail


def resolve_full_precision_window(cfg: EngineConfig, attention: str) -> int:
    """The full-precision tail's window (`paged_attention.tail`): the default where the cache
    and backend have it, else 0; one asked for where it cannot be had raises."""
    window = cfg.kv_full_precision_window
    if window is None:
        usable = (cfg.kv_compression == "fp8" and attention in TAIL_BACKENDS
                  and not cfg.enable_prefix_caching)
        return DEFAULT_FULL_PRECISION_WINDOW if usable else 0
    if window == 0:
        return 0
    if cfg.kv_compression == "none":
        raise ValueError("kv_full_precision_window applies to a compressed KV cache "
                         "(kv_compression 'fp8' or codes)")
    if attention not in TAIL_BACKENDS:
        raise ValueError(f"attention backend {attention!r} has no full-precision tail for a "
                         f"{cfg.kv_compression!r} cache yet; use one of {TAIL_BACKENDS} or "
                         "kv_full_precision_window=0")
    if cfg.enable_prefix_caching:  # a shared prefix's tail lives in another sequence's slot
        raise ValueError("kv_full_precision_window does not combine with prefix caching yet; "
                         "set kv_full_precision_window=0 or enable_prefix_caching=False")
    return window
