"""The one error a malformed checkpoint raises, naming the file and the tensor or key, and the
checks of checkpoint values (JSON objects, positive integers, finite numbers) that raise it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dendrite_jax.validation import is_finite_real, is_int


class CheckpointError(ValueError):
    """A checkpoint file (GGUF, safetensors, config.json, shard index, tokenizer files) is
    malformed or does not fit the model. `path` is the file; `name` the tensor or key, if
    one is to blame."""

    def __init__(self, path: Path | str, problem: str, name: str | None = None) -> None:
        self.path, self.name, self.problem = Path(path), name, problem
        where = f" {name!r}:" if name is not None else ""
        super().__init__(f"{path}:{where} {problem}")


def positive_int(value: Any, path: Path | str, key: str) -> int:
    """`value` if it is an integer >= 1 (bools are not integers), else CheckpointError."""
    if not is_int(value) or value < 1:
        raise CheckpointError(path, f"must be a positive integer, got {value!r}", key)
    return int(value)


def finite_float(value: Any, path: Path | str, key: str, *, positive: bool = False) -> float:
    """`value` as a float if it is a finite number (and > 0 with `positive`)."""
    if not is_finite_real(value):
        raise CheckpointError(path, f"must be a finite number, got {value!r}", key)
    if positive and value <= 0:
        raise CheckpointError(path, f"must be positive, got {value!r}", key)
    return float(value)


def json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path` ({} for a missing file with `missing_ok`)."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise CheckpointError(path, "file not found")
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"must hold a JSON object, not {type(value).__name__}")
    return value
