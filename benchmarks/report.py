"""What every benchmark's JSON records about the run, and how it is written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax


def header(benchmark: str, **fields) -> dict:
    """The report's opening fields: the benchmark, the device and JAX it ran on, the date."""
    return {"benchmark": benchmark, "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), **fields}


def write(report: dict, path: str | Path) -> Path:
    """Write the report as indented JSON (creating its folder); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out
