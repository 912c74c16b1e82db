"""Presets in configs/: every model preset loads, every engine preset names only LLM settings
and builds an engine, and bad presets are refused naming the problem."""

from __future__ import annotations

import pytest

from dendrite_jax import LLM
from dendrite_jax.config import (
    SETTINGS,
    EngineConfig,
    engine_preset_names,
    load_engine_preset,
    load_preset,
    preset_names,
)
from dendrite_jax.engine.settings import resolve


def test_model_presets_load():
    assert {"smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "tiny-random"} <= set(preset_names())
    for name in preset_names():
        assert load_preset(name).name == name


def test_engine_presets_are_llm_settings():
    assert {"cpu", "gpu-serving", "long-context"} <= set(engine_preset_names())
    for name in engine_preset_names():
        assert load_engine_preset(name, SETTINGS)


def test_engine_preset_builds_and_arguments_win():
    llm = LLM.from_engine_preset("cpu", model="tiny-random", max_num_seqs=2,
                                 compilation_cache=False)
    assert llm.engine.cfg.max_num_seqs == 2  # the argument
    assert llm.engine.prefix_cache is not None  # the preset


def test_resolve_makes_platform_defaults_concrete():
    unset = EngineConfig()
    cpu, gpu = resolve(unset, "cpu", head_dim=64), resolve(unset, "gpu", head_dim=64)
    assert (cpu.decode_burst, cpu.device_automata, cpu.threaded_launch) == (1, False, False)
    assert (gpu.decode_burst, gpu.device_automata, gpu.threaded_launch) == (4, True, None)
    assert (cpu.warmup, gpu.warmup) == (False, True)
    assert (cpu.layer_loop, gpu.layer_loop) == ("scan", "unrolled")
    assert (cpu.attention_backend, gpu.attention_backend) == ("reference", "pallas_gpu")
    assert cpu.split_constrained_steps is False and cpu.fp8_fold_norms is None
    assert resolve(unset, "gpu", head_dim=64, on_mesh=True).device_automata is False
    fp8 = resolve(EngineConfig(weights_dtype="mxfp8"), "gpu", head_dim=64)
    assert fp8.fp8_fold_norms is True and fp8.fp8_matmul == "pallas_gpu"
    chosen = EngineConfig(decode_burst=2, device_automata=True, threaded_launch=True,
                          split_constrained_steps=True, warmup=False, layer_loop="unrolled",
                          attention_backend="reference", fp8_matmul="reference",
                          triton_gemms=True, kv_full_precision_window=0)
    assert resolve(chosen, "cpu", head_dim=64) == chosen  # what the caller chose stays
    once = resolve(unset, "gpu", head_dim=64)
    assert resolve(once, "gpu", head_dim=64) == once  # idempotent
    with pytest.raises(ValueError, match="needs layer_loop='unrolled'"):
        resolve(EngineConfig(weights_dtype="fp8", fp8_keep_layers=(0,), layer_loop="scan"),
                "cpu", head_dim=64)


def test_unknown_settings_are_refused():
    with pytest.raises(TypeError, match="unknown settings \\['max_num_seq'\\]"):
        LLM(model="tiny-random", max_num_seq=2)
    with pytest.raises(ValueError, match="unknown layer_loop 'loop'"):
        EngineConfig(layer_loop="loop")


def test_stats_report_the_resolved_settings():
    llm = LLM(model="tiny-random", max_num_seqs=2, compilation_cache=False)
    stats = llm.stats()
    assert stats.config == llm.engine.cfg and stats.config.decode_burst == 1  # this CPU
    assert stats.attention_backend == "reference"


def test_bad_engine_presets(tmp_path):
    with pytest.raises(ValueError, match="unknown engine preset"):
        load_engine_preset("nope", SETTINGS)
    typo = tmp_path / "typo.toml"
    typo.write_text("[engine]\nmax_num_seq = 4\n")
    with pytest.raises(ValueError, match="unknown engine settings \\['max_num_seq'\\]"):
        load_engine_preset(str(typo), SETTINGS)
    empty = tmp_path / "empty.toml"
    empty.write_text("dtype = 'float32'\n")
    with pytest.raises(ValueError, match="needs an \\[engine\\] table"):
        load_engine_preset(str(empty), SETTINGS)


def test_gpu_steps_compile_with_cublas_gemms_unless_asked():
    from dendrite_jax.engine.engine import step_compiler_options

    auto = resolve(EngineConfig(), "gpu", head_dim=64)
    assert auto.triton_gemms is False
    assert step_compiler_options("gpu", auto) == {"xla_gpu_enable_triton_gemm": False}
    on = resolve(EngineConfig(triton_gemms=True), "gpu", head_dim=64)
    assert step_compiler_options("gpu", on) == {}
    assert step_compiler_options("cpu", resolve(EngineConfig(), "cpu", head_dim=64)) == {}


def test_fp8_caches_get_a_full_precision_tail_where_it_can_be_had():
    fp8 = EngineConfig(kv_compression="fp8")
    assert resolve(fp8, "cpu", head_dim=64).kv_full_precision_window == 32
    assert resolve(fp8, "gpu", head_dim=64).kv_full_precision_window == 32
    assert resolve(fp8, "tpu", head_dim=64).kv_full_precision_window == 0  # no kernel yet
    shared = EngineConfig(kv_compression="fp8", enable_prefix_caching=True)
    assert resolve(shared, "cpu", head_dim=64).kv_full_precision_window == 0
    assert resolve(EngineConfig(), "cpu", head_dim=64).kv_full_precision_window == 0
    asked = dict(kv_compression="fp8", kv_full_precision_window=8)
    codes = EngineConfig(kv_compression="turboquant-mse-4", kv_full_precision_window=8)
    assert resolve(codes, "cpu", head_dim=64).kv_full_precision_window == 8
    assert resolve(EngineConfig(kv_compression="turboquant-mse-4"), "cpu",
                   head_dim=64).kv_full_precision_window == 0
    assert resolve(EngineConfig(**asked), "gpu", head_dim=64).kv_full_precision_window == 8
    for bad, match in [(dict(asked, enable_prefix_caching=True), "prefix caching"),
                       (dict(asked, kv_compression="none"), "applies to"),
                       (dict(asked, kv_compression="turboquant-mse-4",
                             attention_backend="pallas_tpu"), "no full-precision tail"),
                       (dict(asked, attention_backend="pallas_tpu"), "no full-precision tail")]:
        with pytest.raises(ValueError, match=match):
            resolve(EngineConfig(**bad), "cpu", head_dim=64)
    with pytest.raises(ValueError, match="must be >= 0"):
        EngineConfig(kv_full_precision_window=-1)
