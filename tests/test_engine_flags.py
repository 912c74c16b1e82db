"""Both command lines take every engine setting as a flag derived from EngineConfig, with its
default, and turn the flags back into the same settings LLM takes."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from absl import flags

from dendrite_jax import engine_flags
from dendrite_jax.config import EngineConfig

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def help_text(module: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--helpfull"], capture_output=True,
                            text=True, timeout=300)
    return result.stdout + result.stderr


@pytest.mark.parametrize("module, missing, server", [
    ("dendrite_jax.run", {"seed", "warmup"}, False),
    ("dendrite_jax.serve", set(), True),
])
def test_every_setting_is_a_flag(module, missing, server):
    text = help_text(module)
    shown = set(re.findall(r"--(?:\[no\])?(\w+):", text))
    assert set(FIELDS) - missing <= shown, sorted(set(FIELDS) - missing - shown)
    seqs = re.search(r"--max_num_seqs:.*?\(default: '(\d+)'\)", text, re.S).group(1)
    assert int(seqs) == (16 if server else FIELDS["max_num_seqs"].default)


def test_flags_become_the_settings(tmp_path):
    """Flags parsed into a fresh FlagValues come back as EngineConfig's values: defaults,
    tri-state and list flags, and an engine preset under explicit flags."""
    preset = tmp_path / "p.toml"
    preset.write_text("[engine]\nmax_num_seqs = 3\ndecode_burst = 2\n")
    values = flags.FlagValues()
    flags.DEFINE_string("engine_preset", None, "", flag_values=values)
    engine_flags.define_engine_flags(flag_values=values)
    values(["prog", "--warmup=off", "--fp8_keep_layers=0,-1", "--decode_burst=5", "--weights_dtype=fp8",
            f"--engine_preset={preset}"])
    settings = engine_flags.engine_settings(values)
    assert set(settings) == set(FIELDS)
    assert settings["warmup"] is False and settings["device_automata"] is None
    assert settings["fp8_keep_layers"] == (0, -1)
    assert settings["decode_burst"] == 5  # the flag given wins over the preset
    assert settings["max_num_seqs"] == 3  # the preset wins over a default
    expected = dataclasses.replace(EngineConfig(), warmup=False, fp8_keep_layers=(0, -1),
                                   weights_dtype="fp8",
                                   decode_burst=5, max_num_seqs=3)
    assert EngineConfig(**settings) == expected
