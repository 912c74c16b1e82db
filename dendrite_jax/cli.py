"""`dendrite`: the command line in vLLM's shape.

    dendrite serve Qwen/Qwen3-0.6B --max-model-len 4096 --enable-prefix-caching --port 8000
    dendrite generate smollm2-135m --prompt "The capital of France is" --max-tokens 16

`dendrite serve` is `python -m dendrite_jax.serve` and `dendrite generate` is
`python -m dendrite_jax.run`: their absl flags stay underneath, and every one of them keeps
its underscore spelling. `translate` turns the arguments into those flags: the model may come
first as a positional argument, every flag may be spelt with dashes as vLLM spells its own
(`--max-num-seqs 16` or `--max-num-seqs=16`), the vLLM flags whose values differ from ours
(`--kv-cache-dtype`, `--quantization`, `--dtype`) are mapped, and vLLM flags we have no
equivalent for are refused with a reason, never ignored.
"""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence

COMMANDS = {"serve": ("dendrite_jax.serve.__main__", "an OpenAI-compatible HTTP server "
                      "(python -m dendrite_jax.serve)"),
            "generate": ("dendrite_jax.run", "complete one prompt and print it with timings "
                         "(python -m dendrite_jax.run)")}
# absl's flags that FlagValues reads itself (not defined as flags), passed on as they are.
ABSL_FLAGS = ("flagfile", "undefok")
ALIASES = {"tp": "tensor_parallel_size"}  # vLLM's `-tp 2`
# vLLM's names for flags we call otherwise.
RENAMED = {"kv_cache_dtype": "kv_compression", "quantization": "weights_dtype"}
REFUSED = {
    "gpu_memory_utilization": "dendrite sizes the KV cache in bytes, not as a fraction of "
                              "device memory: use --kv-cache-bytes (or --num-pages)",
}
_KV_COMPRESSION = re.compile(r"none|turboquant(-mse)?-\d+|polarquant-\d+|qjl-\d+")
_KV_CHOICES = "none, turboquant-<bits>, turboquant-mse-<bits>, polarquant-<2|4|8>, qjl-<dim>"


class CommandLineError(ValueError):
    """Arguments the command line cannot hand to its flags."""


def _kv_cache_dtype(value: str) -> str | None:
    if value == "auto":  # vLLM: the model's dtype, an uncompressed cache
        return "none"
    if _KV_COMPRESSION.fullmatch(value):
        return value
    if value in ("fp8", "fp8_e4m3"):  # E4M3 pages with per-(layer, head) scales
        return "fp8"
    if value.startswith("fp8"):
        raise CommandLineError(f"--kv-cache-dtype {value}: the FP8 cache is E4M3 (fp8, "
                               "fp8_e4m3); E5M2 is not kept")
    raise CommandLineError(f"--kv-cache-dtype {value}: not a KV cache dendrite keeps; choose "
                           f"auto (= none) or a compression: {_KV_CHOICES}")


def _quantization(value: str) -> str | None:
    if value.lower() == "none":
        return None
    if value in ("fp8", "mxfp8", "fp8-channel"):
        return value
    raise CommandLineError(f"--quantization {value}: dendrite quantizes weights itself, to FP8 "
                           "only: fp8 (= mxfp8, block scales) or fp8-channel")


def _dtype(value: str) -> str | None:
    if value == "auto":  # keep our default (float32)
        return None
    if value in ("half", "float16"):
        raise CommandLineError(f"--dtype {value}: dendrite computes in float32 or bfloat16")
    return {"float": "float32"}.get(value, value)


# Values spelt as vLLM spells them, turned into ours; None drops the flag (our default).
CONVERTERS: dict[str, Callable[[str], str | None]] = {
    "kv_compression": _kv_cache_dtype, "weights_dtype": _quantization, "dtype": _dtype}

# The vLLM flags we share, for --help and the README: (vLLM's spelling, ours, how it maps).
VLLM_FLAGS = (
    ("MODEL (positional)", "--model", "preset, .gguf, checkpoint directory or repo id"),
    ("--tensor-parallel-size, -tp", "--tensor_parallel_size", ""),
    ("--max-model-len", "--max_model_len", ""),
    ("--max-num-seqs", "--max_num_seqs", ""),
    ("--max-num-batched-tokens", "--max_num_batched_tokens", ""),
    ("--[no-]enable-prefix-caching", "--[no]enable_prefix_caching", ""),
    ("--kv-cache-dtype", "--kv_compression", "auto = none, fp8 (E4M3), or ours: turboquant-4, ..."),
    ("--quantization fp8", "--weights_dtype", "fp8 (= mxfp8) or fp8-channel"),
    ("--dtype", "--dtype", "auto = float32, float = float32, bfloat16; no float16"),
    ("--seed", "--seed", "generate: the request's seed; serve: the engine's default"),
    ("--revision", "--revision", "with a Hugging Face repo id"),
    ("--chat-template", "--chat_template", "a Jinja file or the template text"),
    ("--tokenizer", "--tokenizer", ""),
    ("--served-model-name", "--served_model_name", "serve: one name"),
    ("--api-key", "--api_key", "serve"),
    ("--host, --port", "--host, --port", "serve"),
    ("--gpu-memory-utilization", "(none)", "refused: use --kv-cache-bytes or --num-pages"),
)


def translate(command: str, args: Sequence[str], flags: Mapping[str, bool]) -> list[str]:
    """absl arguments for `dendrite <command> <args>`. `flags` maps each flag the command line
    defines to whether it is boolean (takes no value). Raises CommandLineError for a flag it
    does not define, a refused one, a value it cannot map, or a stray argument."""
    out: list[str] = []
    models: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            models += rest
            break
        if not arg.startswith("-") or arg == "-":
            models.append(arg)
            continue
        spelt, has_value, value = arg.lstrip("-").partition("=")
        name = ALIASES.get(spelt, spelt.replace("-", "_"))
        name = RENAMED.get(name, name)
        if name in REFUSED:
            raise CommandLineError(f"--{spelt}: {REFUSED[name]}")
        negated = name not in flags and _negated(name, flags)
        if negated:
            name = negated
        elif name not in flags and name not in ABSL_FLAGS:
            raise CommandLineError(f"unknown flag --{spelt} (`dendrite {command} --help` lists "
                                   "the flags)")
        if flags.get(name):  # boolean: no separate value
            if negated and has_value:
                raise CommandLineError(f"--{spelt} takes no value")
            out.append(f"--{'no' if negated else ''}{name}" + (f"={value}" if has_value else ""))
            continue
        if not has_value:
            if not rest:
                raise CommandLineError(f"--{spelt} needs a value")
            value = rest.pop(0)
        converted = CONVERTERS[name](value) if name in CONVERTERS else value
        if converted is not None:
            out.append(f"--{name}={converted}")
    if len(models) > 1:
        raise CommandLineError(f"dendrite {command} takes one model, got {models}")
    if models:
        if any(a.startswith("--model=") for a in out):
            raise CommandLineError(f"the model is given twice: {models[0]!r} and --model")
        out.insert(0, f"--model={models[0]}")
    return out


def _negated(name: str, flags: Mapping[str, bool]) -> str | None:
    """The boolean flag `name` negates (vLLM's no_<flag>, absl's no<flag>), else None."""
    for prefix in ("no_", "no"):
        base = name.removeprefix(prefix)
        if base != name and flags.get(base):
            return base
    return None


def flag_kinds(flag_values) -> dict[str, bool]:
    """Every flag `flag_values` defines, mapped to whether it is boolean."""
    return {name: bool(flag_values[name].boolean) for name in flag_values}


def usage() -> str:
    lines = ["usage: dendrite <command> [MODEL] [flags]", "", "commands:"]
    lines += [f"  {name:<10}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`dendrite <command> --help` lists its flags in vLLM's dashed spellings",
              "(--max-num-seqs); each keeps its underscore spelling too (--max_num_seqs)."]
    return "\n".join(lines)


def command_help(command: str, flag_values) -> str:
    """The flags of `dendrite <command>`, dashed, with the vLLM spellings that map onto them."""
    module = COMMANDS[command][0]
    lines = [f"usage: dendrite {command} [MODEL] [flags]", "", COMMANDS[command][1], "",
             "vLLM's spellings:"]
    lines += [f"  {vllm:<30}{ours:<28}{note}".rstrip() for vllm, ours, note in VLLM_FLAGS
              if all(name in flag_values for name in re.findall(r"--(?:\[no\])?(\w+)", ours))]
    lines += ["", "flags (each also spelt with underscores; --helpfull: absl's own list):"]
    by_module = flag_values.flags_by_module_dict()
    owned = [*by_module.get(module, []), *by_module.get("dendrite_jax.engine_flags", [])]
    for flag in sorted(owned, key=lambda f: f.name):
        dashed = flag.name.replace("_", "-")
        name = f"--[no-]{dashed}" if flag.boolean else f"--{dashed}"
        default = "" if flag.default in (None, "", []) else f" (default: {flag.value})"
        lines.append(f"  {name}")
        lines += textwrap.wrap(f"{flag.help}{default}", 92, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The `dendrite` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, args = args[0], args[1:]
    if command not in COMMANDS:
        print(f"dendrite: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    from absl import app, flags

    try:
        module = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as e:
        print(f"dendrite {command}: needs the package {e.name!r}: pip install "
              "'dendrite-jax[serve]'", file=sys.stderr)
        return 1
    if any(a in ("-h", "--help") for a in args):
        print(command_help(command, flags.FLAGS))
        return 0
    app.define_help_flags()  # --helpfull and its kin, which app.run would define
    try:
        absl_args = translate(command, args, flag_kinds(flags.FLAGS))
    except CommandLineError as e:
        print(f"dendrite {command}: error: {e}", file=sys.stderr)
        return 2
    app.run(module.main, argv=[f"dendrite {command}", *absl_args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
