"""Flags the command lines share: `--engine_preset` fills in what no flag set explicitly;
`--coordinator_address` / `--num_processes` / `--process_id` join a multi-host job;
`--fp8_keep_layers` and `--fp8_fold_norms` go with `--weights_dtype`."""

from __future__ import annotations

import inspect

from absl import flags

from dendrite_jax.config import engine_preset_names, load_engine_preset

flags.DEFINE_string("engine_preset", None,
                    "Engine settings from configs/engine/<name>.toml "
                    f"({', '.join(engine_preset_names())}) or a .toml path; flags given "
                    "explicitly win.")

flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0's coordinator; every process runs the "
                    "same command with its own --process_id (see README, multi-device).")
flags.DEFINE_integer("num_processes", 1, "Multi-host: processes in the job.")
flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index (0 reports).")

flags.DEFINE_list("fp8_keep_layers", [], "With --weights_dtype: layers (indices, negative from "
                  "the end) kept unquantized, e.g. 0,1,-1.")


flags.DEFINE_enum("fp8_fold_norms", "auto", ["auto", "on", "off"],
                  "With --weights_dtype: fold the RMS norms into q/k/v and gate/up (auto: for "
                  "mxfp8, not fp8-channel; LLM's fp8_fold_norms).")


def fp8_fold_norms() -> bool | None:
    """--fp8_fold_norms as LLM's fp8_fold_norms."""
    return {"auto": None, "on": True, "off": False}[flags.FLAGS.fp8_fold_norms]


def fp8_keep_layers() -> list[int]:
    """--fp8_keep_layers as integers."""
    try:
        return [int(v) for v in flags.FLAGS.fp8_keep_layers]
    except ValueError:
        raise ValueError("--fp8_keep_layers takes layer indices (integers), got "
                         f"{','.join(flags.FLAGS.fp8_keep_layers)}") from None


def join_processes() -> None:
    """Join the multi-host job the flags describe (nothing for one process)."""
    if flags.FLAGS.num_processes == 1 and not flags.FLAGS.coordinator_address:
        return
    if not flags.FLAGS.coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address (host:port)")
    from dendrite_jax.parallel import distributed

    distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                           flags.FLAGS.process_id)


def llm_kwargs(**from_flags) -> dict:
    """LLM keyword arguments: the flags' values, with the engine preset's settings wherever the
    flag of the same name was not given on the command line."""
    from dendrite_jax import LLM

    name = flags.FLAGS.engine_preset
    if not name:
        return from_flags
    allowed = set(inspect.signature(LLM.__init__).parameters) - {"self", "model"}
    preset = load_engine_preset(name, allowed)
    explicit = {k for k in from_flags if k in flags.FLAGS and flags.FLAGS[k].present}
    return {**from_flags, **{k: v for k, v in preset.items() if k not in explicit}}
