"""Presets in configs/: every model preset loads, every engine preset names only LLM settings
and builds an engine, and bad presets are refused naming the problem."""

from __future__ import annotations

import inspect

import pytest

from dendrite_jax import LLM
from dendrite_jax.config import (
    engine_preset_names,
    load_engine_preset,
    load_preset,
    preset_names,
)

LLM_SETTINGS = set(inspect.signature(LLM.__init__).parameters) - {"self", "model"}


def test_model_presets_load():
    assert {"smollm2-135m", "llama-3.2-1b", "llama-3.1-8b", "tiny-random"} <= set(preset_names())
    for name in preset_names():
        assert load_preset(name).name == name


def test_engine_presets_are_llm_settings():
    assert {"cpu", "gpu-serving", "long-context"} <= set(engine_preset_names())
    for name in engine_preset_names():
        assert load_engine_preset(name, LLM_SETTINGS)


def test_engine_preset_builds_and_arguments_win():
    llm = LLM.from_engine_preset("cpu", model="tiny-random", max_num_seqs=2,
                                 compilation_cache=False)
    assert llm.engine.cfg.max_num_seqs == 2  # the argument
    assert llm.engine.prefix_cache is not None  # the preset


def test_bad_engine_presets(tmp_path):
    with pytest.raises(ValueError, match="unknown engine preset"):
        load_engine_preset("nope", LLM_SETTINGS)
    typo = tmp_path / "typo.toml"
    typo.write_text("[engine]\nmax_num_seq = 4\n")
    with pytest.raises(ValueError, match="unknown engine settings \\['max_num_seq'\\]"):
        load_engine_preset(str(typo), LLM_SETTINGS)
    empty = tmp_path / "empty.toml"
    empty.write_text("dtype = 'float32'\n")
    with pytest.raises(ValueError, match="needs an \\[engine\\] table"):
        load_engine_preset(str(empty), LLM_SETTINGS)
