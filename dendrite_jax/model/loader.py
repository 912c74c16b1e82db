"""Resolve a model argument to config, params and tokenizer.

`model` may be a preset name (`smollm2-135m`, `llama-3.2-1b`), a preset `.toml` path, a
`.gguf` file, or a Hugging Face checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from dendrite_jax.config import ModelConfig, Preset, load_preset
from dendrite_jax.model.params import Params
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


def load_model(model: str, dtype: str) -> LoadedModel:
    path = Path(model).expanduser()
    if path.is_dir():
        cfg, params = load_hf(path, dtype)
        return _checked(LoadedModel(cfg, params, Tokenizer.from_hf_dir(path), str(path)))
    if path.suffix == ".gguf":
        return _load_gguf_file(path, dtype)
    preset = load_preset(model)
    if preset.checkpoint.format == "random":
        assert preset.model is not None, "random presets carry a [model] table"
        return LoadedModel(preset.model, load_random(preset.model, dtype, preset.checkpoint.seed),
                           None, f"{preset.name} (random weights)")
    return _load_gguf_file(preset_gguf_path(preset), dtype, name=preset.name)


def _load_gguf_file(path: Path, dtype: str, name: str | None = None) -> LoadedModel:
    cfg, params, gguf = load_gguf(path, dtype)
    if name:
        cfg = dataclasses.replace(cfg, name=name)
    return _checked(LoadedModel(cfg, params, Tokenizer.from_gguf(gguf), str(path)))


def _checked(model: LoadedModel) -> LoadedModel:
    tokenizer = model.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{model.source}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model's embedding has only {model.config.vocab_size} rows")
    return model
