"""Running the parallel tests' worker scripts in subprocesses (a process's device count is fixed
when JAX starts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TP_WORKER = Path(__file__).with_name("tp_worker.py")


def run_worker(model: str, sizes: str, replicas: str = "", backend: str = "auto",
               layer_loop: str = "auto") -> dict:
    """`tp_worker.py`'s report: tokens (and prompt log-probabilities) per parallel size."""
    out = subprocess.run([sys.executable, str(TP_WORKER), model, sizes, replicas, backend,
                          layer_loop],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
