"""Multi-host tensor parallelism, on one machine: two processes with two CPU devices each join
one job (`jax.distributed.initialize`, gloo collectives) and split a model over devices of both;
they give one device's greedy tokens and prompt log-probabilities, and through the command line
SmolLM2's text, printed by process 0 only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.parallel import distributed
from tests.parallel.workers import ROOT, run_worker

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return f"localhost:{s.getsockname()[1]}"


def run_job(commands: list[list[str]], env: dict | None = None) -> list[str]:
    """Start the processes together (each blocks until all have joined); their stdouts."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env) for c in commands]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        # gloo's own connection messages ("[Gloo] Rank 1 is connected to 1 peer ranks...") go
        # to stdout too, at times split across lines by the other process's output
        outs.append("".join(line for line in out.splitlines(keepends=True)
                            if "[Gloo]" not in line and "peer ranks" not in line))
    return outs


def test_random_model_over_two_processes(random_preset):
    address = free_address()
    outs = run_job([[sys.executable, str(WORKER), random_preset, address, str(i), "4"]
                    for i in range(2)])
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    base = run_worker(random_preset, "1")["1"]
    for got in reports:
        assert got["processes"] == 2
        assert got["cache_devices"] == 4 and got["cache_processes"] == 2
        assert got["tokens"] == base["tokens"]
        for a, b in zip(got["prompt_logprobs"], base["prompt_logprobs"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_command_line_over_two_processes():
    """`python -m dendrite_jax.run` with the multi-host flags: SmolLM2 split 3 ways over devices
    of two processes prints one device's greedy completion, once."""
    prompt, max_tokens = "The capital of France is", 8
    want = LLM(model="smollm2-135m", compilation_cache=False).generate(
        [prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0].text
    address = free_address()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    outs = run_job([[sys.executable, "-m", "dendrite_jax.run", "--model=smollm2-135m",
                     f"--prompt={prompt}", f"--max_tokens={max_tokens}",
                     "--tensor_parallel_size=3", f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={i}"] for i in range(2)], env)
    assert outs[0].strip() == want.strip()
    assert outs[1] == ""


@pytest.mark.parametrize("address,n,pid,match", [
    ("localhost", 2, 0, "host:port"), ("localhost:1234", 0, 0, "at least 1"),
    ("localhost:1234", 2, 2, r"process_id must be in \[0, 2\)")])
def test_bad_arguments_are_refused(address, n, pid, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(address, n, pid)
