"""Resolve a model argument to config, params and tokenizer.

`model` may be a preset name (`smollm2-135m`, `llama-3.2-1b`), a preset `.toml` path, a
`.gguf` file, a Hugging Face checkpoint directory, or a Hugging Face repo id (`Qwen/Qwen3-0.6B`)
found in the local Hugging Face cache at a `revision` (`model.hub`; downloaded only where
`allow_download`). A local path that exists wins over a repo id of the same spelling.
`tokenizer` replaces the model's own (or gives a random-weight preset one): a Hugging Face
tokenizer directory, a `.gguf` file or a repo id. `chat_template` (a Jinja file or the
template itself) replaces the tokenizer's chat template.
A malformed checkpoint raises `CheckpointError` (a ValueError) naming the file and the tensor
or key; weights holding NaN or infinity are refused at load. Nothing a checkpoint or preset
names is imported or executed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from dendrite_jax.config import ModelConfig, Preset, load_preset
from dendrite_jax.model import hub
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


def load_tokenizer(source: str, allow_download: bool = False) -> Tokenizer:
    """A tokenizer from a Hugging Face directory (tokenizer.json, tokenizer_config.json), the
    metadata of a .gguf file, or a Hugging Face repo id's tokenizer files (main revision)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        return Tokenizer.from_gguf(GgufFile(path))
    if not path.exists() and hub.is_repo_id(source):
        return Tokenizer.from_hf_dir(hub.resolve_repo_id(source, None, allow_download,
                                                         hub.TOKENIZER_FILES))
    raise ValueError(f"tokenizer {source!r}: not a Hugging Face tokenizer directory, a .gguf "
                     "file or a Hugging Face repo id")


def chat_template_text(template: str) -> str:
    """A chat template given as a file (a .jinja file, say) or as the Jinja text itself."""
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(errors="replace")
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(f"chat template {template!r}: no such file, nor a Jinja template "
                     "(no '{{' or '{%' in it)")


def with_chat_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    """`tokenizer` rendering chats with `template` (Jinja text) instead of its own."""
    # Hook point: the same tokenizer rebuilt around another template. A
    # `Tokenizer.with_chat_template(template)` method in model/tokenizer.py would keep the
    # constructor's fields in one place; until then this copies them.
    import jinja2

    try:
        return Tokenizer(tokenizer.backend, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, chat_template=template,
                         add_bos_token=tokenizer.add_bos_token,
                         stop_token_ids=tokenizer.stop_token_ids)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


def check_finite(model: LoadedModel) -> LoadedModel:
    """`model` if its weights hold no NaN or infinity, else CheckpointError naming them."""
    bad = nonfinite_weights(model.params)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(model.source, f"weights hold NaN or infinite values: {shown}")
    return model


def load_model(model: str, dtype: str, tokenizer: str | None = None, *,
               revision: str | None = None, allow_download: bool = False,
               chat_template: str | None = None) -> LoadedModel:
    loaded = _load(model, dtype, revision, allow_download)
    if tokenizer is not None:
        loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(tokenizer, allow_download))
    if chat_template is not None:
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source} has no tokenizer to take a chat template; pass "
                             "tokenizer= as well")
        loaded = dataclasses.replace(loaded, tokenizer=with_chat_template(
            loaded.tokenizer, chat_template_text(chat_template)))
    return _checked(loaded)


def _load(model: str, dtype: str, revision: str | None, allow_download: bool) -> LoadedModel:
    path = Path(model).expanduser()
    if not path.exists() and hub.is_repo_id(model):
        return check_finite(_load_repo(model, dtype, revision, allow_download))
    if revision is not None:
        raise ValueError(f"revision {revision!r} applies to Hugging Face repo ids (org/name); "
                         f"{model!r} is a local path or a preset")
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


def _load_repo(repo_id: str, dtype: str, revision: str | None,
               allow_download: bool) -> LoadedModel:
    snapshot = hub.resolve_repo_id(repo_id, revision, allow_download)
    # The snapshot's files are links to blobs in the repo's cache folder, two levels up.
    cfg, params = load_hf(snapshot, dtype, within=snapshot.parent.parent)
    cfg = dataclasses.replace(cfg, name=repo_id)  # not the snapshot's commit hash
    return LoadedModel(cfg, params, Tokenizer.from_hf_dir(snapshot), str(snapshot))


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
