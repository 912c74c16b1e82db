"""Flags the command lines share: one per engine setting, derived from `EngineConfig` (name,
type, default, help), so the two command lines cannot disagree with `LLM` or each other;
`--engine_preset` fills in what no flag set explicitly; the model's load options (`--tokenizer`,
`--revision`, `--allow_download`, `--chat_template`; `load_options`); `--coordinator_address` /
`--num_processes` / `--process_id` join a multi-host job."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from dendrite_jax.config import SETTINGS, EngineConfig, engine_preset_names, load_engine_preset

TRI_STATE = {"auto": None, "on": True, "off": False}  # flags of settings a platform may decide
TRI_STATE_SETTINGS = frozenset(f.name for f in dataclasses.fields(EngineConfig)
                               if f.type == "bool | None")

flags.DEFINE_string("engine_preset", None,
                    "Engine settings from configs/engine/<name>.toml "
                    f"({', '.join(engine_preset_names())}) or a .toml path; flags given "
                    "explicitly win.")

# LLM's load options: how the model is found and read, not how the engine runs it.
flags.DEFINE_string("tokenizer", None, "Tokenizer to use instead of the model's own: a Hugging "
                    "Face tokenizer directory, a .gguf file or a Hugging Face repo id.")
flags.DEFINE_string("revision", None, "With a Hugging Face repo id as the model: its branch, "
                    "tag or commit (default: main).")
flags.DEFINE_bool("allow_download", False, "Download a Hugging Face repo id that is not in the "
                  "local cache ($HF_HUB_CACHE, else $HF_HOME/hub); HF_HUB_OFFLINE=1 forbids it.")
flags.DEFINE_string("chat_template", None, "A Jinja chat template replacing the model's: a file "
                    "or the template text.")

flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0's coordinator; every process runs the "
                    "same command with its own --process_id (see README, multi-device).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: processes in the job.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index (0 reports).")

# The engine settings each FlagValues holds as flags (a command line's own flag may share a
# setting's name: run's --seed is its request's).
_DEFINED: dict[int, list[str]] = {}


def define_engine_flags(defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = (),
                        flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """One flag per EngineConfig field but `exclude`: a setting the platform may decide
    (default None) is `--name=auto|on|off`, an enumerated one an enum, a tuple a list.
    `defaults` changes a default for this command line (its --help shows it)."""
    defaults = defaults or {}
    _DEFINED.setdefault(id(flag_values), []).extend(
        f.name for f in dataclasses.fields(EngineConfig) if f.name not in exclude)
    unknown = sorted(set(defaults) - SETTINGS)
    if unknown:
        raise ValueError(f"no engine settings {unknown}")
    for field in dataclasses.fields(EngineConfig):
        if field.name in exclude:
            continue
        name, help_text = field.name, field.metadata["help"]
        default = defaults.get(name, field.default)
        choices = field.metadata["choices"]
        fv = dict(flag_values=flag_values)
        if field.type == "bool | None":
            flags.DEFINE_enum(name, {v: k for k, v in TRI_STATE.items()}[default],
                              list(TRI_STATE), help_text, **fv)
        elif choices:
            flags.DEFINE_enum(name, default, list(choices), help_text, **fv)
        elif field.type == "bool":
            flags.DEFINE_bool(name, default, help_text, **fv)
        elif field.type.startswith("int"):
            flags.DEFINE_integer(name, default, help_text, **fv)
        elif field.type.startswith("tuple"):
            flags.DEFINE_list(name, [str(v) for v in default], help_text, **fv)
        else:
            flags.DEFINE_string(name, default, help_text, **fv)


def engine_settings(flag_values: flags.FlagValues = flags.FLAGS, **fixed: Any) -> dict[str, Any]:
    """LLM's settings from the engine flags, with the engine preset's wherever the flag of the
    same name was not given on the command line; `fixed` ones win over both."""
    defined = _DEFINED.get(id(flag_values), [])
    values = {}
    for name in defined:
        value = flag_values[name].value
        if name in TRI_STATE_SETTINGS:
            value = TRI_STATE[value]
        elif name == "fp8_keep_layers":
            value = _layer_indices(value)
        values[name] = value
    preset_name = flag_values["engine_preset"].value if "engine_preset" in flag_values else None
    if preset_name:
        preset = load_engine_preset(preset_name, SETTINGS)
        values.update({k: v for k, v in preset.items()
                       if k not in defined or not flag_values[k].present})
    return {**values, **fixed}


def load_options(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """LLM's load options (tokenizer, revision, allow_download, chat_template) from the flags."""
    return {name: flag_values[name].value
            for name in ("tokenizer", "revision", "allow_download", "chat_template")}


def _layer_indices(values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError("--fp8_keep_layers takes layer indices (integers), got "
                         f"{','.join(values)}") from None


def join_processes() -> None:
    """Join the multi-host job the flags describe (nothing for one process)."""
    if flags.FLAGS.num_processes == 1 and not flags.FLAGS.coordinator_address:
        return
    if not flags.FLAGS.coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address (host:port)")
    from dendrite_jax.parallel import distributed

    distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                           flags.FLAGS.process_id)
