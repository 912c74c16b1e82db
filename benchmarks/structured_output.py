"""Structured output: constrained vs unconstrained decode throughput, and the host time to fill
a token mask.

    python benchmarks/structured_output.py                  # SmolLM2 on CPU
    python benchmarks/structured_output.py --model=llama-3.2-1b --dtype=bfloat16 \
        --tokenizer=DIR --output=...                        # 1B shape, SmolLM2's tokenizer

A random-weight preset has no tokenizer: `--tokenizer` lends it one (a directory written by
`Tokenizer.save_hf_dir`, or a .gguf file).

For each batch size: unconstrained greedy decoding; the same prompts under a regex that allows
any text (mask work without changing the length); under a JSON schema (an array of 40 short
strings, longer than `--max_tokens`); and under a schema of records (an array of objects with
fixed keys, whose key names and punctuation the grammar forces: what `--forced_tokens`, the
engine's `forced_tokens`, appends without sampling). Every run generates `--max_tokens` tokens
per request (EOS ignored where the constraint allows it); throughput is generated tokens per
second of the fastest of `--repeats` interleaved runs. The mask fill time per constrained row
(p50/p99) comes from the engine's log of fills: rows on the host's llguidance matchers only.
On accelerators the three constraints run as device automata by default
(`--device_automata`), whose masks are part of the step; each row records which constraints
stayed on the host and why (`host_matchers`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model preset or path.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_list("batches", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("max_tokens", 64, "New tokens per request.")
flags.DEFINE_integer("repeats", 3, "Timed runs per variant, interleaved; the fastest counts.")
flags.DEFINE_string("tokenizer", None, "Tokenizer for a model without one (HF directory or .gguf).")
flags.DEFINE_string("output", "benchmarks/results/structured_output_cpu.json", "JSON output.")
flags.DEFINE_enum("split_constrained_steps", "auto", ["auto", "on", "off"],
                  "Launch constrained decode steps as two executables (forward, then sampling "
                  "with the mask): the engine's default (auto) or forced either way.")
SETTING = {"auto": None, "on": True, "off": False}  # an engine default, or forced
flags.DEFINE_enum("threaded_launch", "auto", ["auto", "on", "off"],
                  "Make constrained steps' executable calls from a worker thread: the engine's "
                  "default (auto: accelerators, steps of 16+ rows) or forced either way.")
flags.DEFINE_enum("device_automata", "auto", ["auto", "on", "off"],
                  "Run regular constraints (here the regex and both JSON schemas) as automata on "
                  "the device: the engine's default (auto: accelerators) or forced either way.")
flags.DEFINE_integer("automaton_states", 24576, "States in the device's automaton table: room for both "
                     "JSON schemas (13,562 and 7,782 states) and the regex at once.")
flags.DEFINE_bool("forced_tokens", False, "Append tokens a constraint forces without sampling "
                  "them (`LLM(forced_tokens=...)`).")

SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 12},
          "minItems": 40, "maxItems": 40}  # long enough to fill max_tokens
RECORDS = {"type": "array", "minItems": 20, "maxItems": 20, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "color", "count"],
    "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 12},
                   "color": {"enum": ["red", "green", "blue"]},
                   "count": {"type": "integer", "minimum": 0, "maximum": 99}}}}


CONSTRAINED = ("any_text_regex", "json_schema", "json_records")


def run(llm: LLM, prompts: list[str], params: SamplingParams, row: dict | None) -> dict:
    """One timed generate; `row` (None the first time: that call compiles) keeps the fastest
    of the repeats and every repeat's mask fills."""
    if row is None:
        llm.generate(prompts, params)  # compile this run's shapes
        row = {"seconds_each": [], "fills": []}
    llm.engine.structured.mask_fills.clear()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    row["seconds_each"].append(seconds)
    row["fills"] += [s / n for s, n in llm.engine.structured.mask_fills]
    row["tokens"] = sum(len(o.token_ids) for o in outputs)
    row["seconds"] = min(row["seconds_each"])
    row["tokens_per_s"] = row["tokens"] / row["seconds"]
    return row


def finish(row: dict) -> dict:
    fills = row.pop("fills")
    if fills:
        row["mask_us_per_row_p50"] = float(np.percentile(fills, 50)) * 1e6
        row["mask_us_per_row_p99"] = float(np.percentile(fills, 99)) * 1e6
    return row


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    report = header("structured_output", model=FLAGS.model, dtype=FLAGS.dtype,
                    tokenizer=FLAGS.tokenizer and Path(FLAGS.tokenizer).name,
                    max_tokens=FLAGS.max_tokens,
                    split_constrained_steps=FLAGS.split_constrained_steps,
                    threaded_launch=FLAGS.threaded_launch,
                    forced_tokens=FLAGS.forced_tokens, device_automata=FLAGS.device_automata,
                    automaton_states=FLAGS.automaton_states, rows=[])
    for batch in (int(b) for b in FLAGS.batches):
        llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=batch, warmup=False,
                  tokenizer=FLAGS.tokenizer,
                  split_constrained_steps=SETTING[FLAGS.split_constrained_steps],
                  threaded_launch=SETTING[FLAGS.threaded_launch],
                  forced_tokens=FLAGS.forced_tokens,
                  device_automata=SETTING[FLAGS.device_automata],
                  automaton_states=FLAGS.automaton_states)
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "List some fruit names as a JSON array."}])
        prompts = [prompt] * batch
        common = dict(max_tokens=FLAGS.max_tokens, temperature=0)
        variants = {"unconstrained": SamplingParams(**common, ignore_eos=True),
                    "any_text_regex": SamplingParams(**common, ignore_eos=True,
                                                     regex=r"(?s:.)*"),
                    "json_schema": SamplingParams(**common, json_schema=SCHEMA),
                    "json_records": SamplingParams(**common, json_schema=RECORDS)}
        runs: dict = dict.fromkeys(variants)
        for _ in range(FLAGS.repeats):  # interleaved, so drifts in machine speed hit all alike
            for name, params in variants.items():
                runs[name] = run(llm, prompts, params, runs[name])
        row = {"batch": batch, **{name: finish(r) for name, r in runs.items()},
               "host_matchers": dict(llm.engine.structured.automaton_reasons)}
        base = row["unconstrained"]["tokens_per_s"]
        for name in CONSTRAINED:
            row[name]["vs_unconstrained"] = row[name]["tokens_per_s"] / base
        report["rows"].append(row)
        del llm
    out = write(report, FLAGS.output)
    print(f"\nstructured output, {report['model']} on {report['device']}, "
          f"{FLAGS.max_tokens} tokens per request")
    print("batch run             tok/s  vs free  mask us/row p50   p99")
    for row in report["rows"]:
        for name in ("unconstrained", *CONSTRAINED):
            r = row[name]
            print(f"{row['batch']:5d} {name:15s} {r['tokens_per_s']:7.0f} "
                  f"{r.get('vs_unconstrained', 1.0):7.2f} "
                  f"{r.get('mask_us_per_row_p50', 0):13.0f} {r.get('mask_us_per_row_p99', 0):6.0f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
