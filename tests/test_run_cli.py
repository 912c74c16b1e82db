"""The command line: a completion with timings, a profile trace, and clean errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def run_cli(*args, cache_dir):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir))
    return subprocess.run([sys.executable, "-m", "dendrite_jax.run", *args], capture_output=True,
                          text=True, timeout=600, env=env)


def test_completion_profile_and_warm_cache(tmp_path):
    trace_dir = tmp_path / "trace"
    cold = run_cli("--prompt=The capital of France is", "--max_tokens=8",
                   f"--profile_dir={trace_dir}", cache_dir=tmp_path)
    assert cold.returncode == 0, cold.stderr
    assert "Paris" in cold.stdout
    assert "time to first token" in cold.stderr
    rate = re.search(r"decode (\S+) tok/s", cold.stderr).group(1)
    assert float(rate) > 0, cold.stderr  # a nan rate fails too
    assert list(trace_dir.rglob("*.xplane.pb")), "no profiler trace written"
    assert list((tmp_path / "dendrite_jax" / "xla").iterdir()), "compilation cache is empty"
    warm = run_cli("--prompt=The capital of France is", "--max_tokens=8", cache_dir=tmp_path)
    assert warm.returncode == 0 and warm.stdout == cold.stdout


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_chat_flag(tmp_path):
    out = run_cli("--chat", "--prompt=Say hello.", "--max_tokens=16", cache_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_errors_print_without_traceback(tmp_path):
    bad_temp = run_cli("--temperature=-1", cache_dir=tmp_path)
    assert bad_temp.returncode != 0
    assert "error: temperature must be >= 0" in bad_temp.stderr
    assert "Traceback" not in bad_temp.stderr
    bad_model = run_cli("--model=/no/such/model.gguf", cache_dir=tmp_path)
    assert bad_model.returncode != 0 and "no such GGUF file" in bad_model.stderr
    assert "Traceback" not in bad_model.stderr


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_engine_preset_and_helpfull(tmp_path):
    """An engine preset fills what no flag set (here max_num_seqs); every flag of the command
    line is listed by --helpfull; a bad preset is a clean error."""
    out = run_cli("--engine_preset=cpu", "--prompt=The capital of France is", "--max_tokens=4",
                  cache_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    helpfull = run_cli("--helpfull", cache_dir=tmp_path)
    for flag in ("--engine_preset", "--tensor_parallel_size", "--weights_dtype",
                 "--kv_compression", "--attention_backend", "--profile_dir"):
        assert flag in helpfull.stdout + helpfull.stderr, flag
    bad = run_cli("--engine_preset=nope", cache_dir=tmp_path)
    assert bad.returncode != 0 and "unknown engine preset 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
