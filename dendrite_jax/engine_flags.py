"""Engine presets on the command line: `--engine_preset` fills in what no flag set explicitly."""

from __future__ import annotations

import inspect

from absl import flags

from dendrite_jax.config import engine_preset_names, load_engine_preset

flags.DEFINE_string("engine_preset", None,
                    "Engine settings from configs/engine/<name>.toml "
                    f"({', '.join(engine_preset_names())}) or a .toml path; flags given "
                    "explicitly win.")


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
