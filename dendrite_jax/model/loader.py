"""Resolve a model argument to config, params and tokenizer.

`model` may be a preset name (`smollm2-135m`, `llama-3.2-1b`), a preset `.toml` path, a
`.gguf` file, or a Hugging Face checkpoint directory. `tokenizer` replaces the model's own (or
gives a random-weight preset one): a Hugging Face tokenizer directory or a `.gguf` file.
A malformed checkpoint raises `CheckpointError` (a ValueError) naming the file and the tensor
or key; weights holding NaN or infinity are refused at load. Nothing a checkpoint or preset
names is imported or executed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from dendrite_jax.config import ModelConfig, Preset, load_preset
from dendrite_jax.model.checkpoint_error import CheckpointError
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.params import Params, nonfinite_weights
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.model.weights import load_gguf, load_hf, load_random


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None  # None for random-weight presets
    source: str


def preset_gguf_path(preset: Preset) -> Path:
    """The GGUF file a preset names inside an installed Python package."""
    spec = preset.checkpoint
    if not spec.python_package.isidentifier():
        # A dotted name would import (run) its parent package to find the child.
        raise ValueError(f"model {preset.name!r}: python_package must be a top-level package "
                         f"name, got {spec.python_package!r}")
    found = importlib.util.find_spec(spec.python_package)
    if found is None or found.origin is None:
        hint = f" ({preset.install_hint})" if preset.install_hint else ""
        raise ValueError(f"model {preset.name!r} needs the Python package "
                         f"{spec.python_package!r}, which is not installed{hint}")
    path = Path(found.origin).parent / spec.file
    if not path.is_file():
        raise ValueError(f"model {preset.name!r}: {path} is missing from package "
                         f"{spec.python_package!r}; reinstall it")
    return path


def load_tokenizer(source: str) -> Tokenizer:
    """A tokenizer from a Hugging Face directory (tokenizer.json, tokenizer_config.json) or the
    metadata of a .gguf file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        return Tokenizer.from_gguf(GgufFile(path))
    raise ValueError(f"tokenizer {source!r}: not a Hugging Face tokenizer directory or a .gguf "
                     "file")


def check_finite(model: LoadedModel) -> LoadedModel:
    """`model` if its weights hold no NaN or infinity, else CheckpointError naming them."""
    bad = nonfinite_weights(model.params)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(model.source, f"weights hold NaN or infinite values: {shown}")
    return model


def load_model(model: str, dtype: str, tokenizer: str | None = None) -> LoadedModel:
    loaded = _load(model, dtype)
    if tokenizer is not None:
        loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(tokenizer))
    return _checked(loaded)


def _load(model: str, dtype: str) -> LoadedModel:
    path = Path(model).expanduser()
    if path.is_dir():
        cfg, params = load_hf(path, dtype)
        return check_finite(LoadedModel(cfg, params, Tokenizer.from_hf_dir(path), str(path)))
    if path.suffix == ".gguf":
        return check_finite(_load_gguf_file(path, dtype))
    preset = load_preset(model)
    if preset.checkpoint.format == "random":
        assert preset.model is not None, "random presets carry a [model] table"
        return LoadedModel(preset.model, load_random(preset.model, dtype, preset.checkpoint.seed),
                           None, f"{preset.name} (random weights)")
    return check_finite(_load_gguf_file(preset_gguf_path(preset), dtype, name=preset.name))


def _load_gguf_file(path: Path, dtype: str, name: str | None = None) -> LoadedModel:
    cfg, params, gguf = load_gguf(path, dtype)
    if name:
        cfg = dataclasses.replace(cfg, name=name)
    return LoadedModel(cfg, params, Tokenizer.from_gguf(gguf), str(path))


def _checked(model: LoadedModel) -> LoadedModel:
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(model.source, f"the tokenizer has {tokenizer.vocab_size} tokens "
                              f"but the model's embedding has only {model.config.vocab_size} rows")
    return model
