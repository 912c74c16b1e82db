"""How often a constrained token is the model's own unconstrained choice.

    python benchmarks/constraint_acceptance.py      # SmolLM2 on CPU, ~2 minutes

Constrained decoding could skip the token mask on the critical path where the model already
picks an allowed token: sample without the mask, check the token against the matcher when it is
read back, and re-run only the rejected rows with the mask (`NOTES.md`, tenth session). Its
cost depends on the rejection rate, measured here for greedy decoding: each of the structured-
output tests' JSON schemas (`tests/grammar/schemas.py`) is generated greedily under its
constraint, then the prompt plus that output is scored as one prompt without any constraint; an
output token whose unconstrained rank is 1 is the model's own argmax, so a mask-free greedy step
would have produced it (accepted), any other is a rejection. Near-ties can flip between the
decode and prefill paths' arithmetic, so the rate is an estimate.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model preset or path (with a tokenizer).")
flags.DEFINE_integer("max_tokens", 120, "Token limit per constrained output.")
flags.DEFINE_string("output", "benchmarks/results/constraint_acceptance_cpu.json", "JSON output.")

SCHEMAS_FILE = Path(__file__).resolve().parents[1] / "tests" / "grammar" / "schemas.py"


def schemas() -> list[dict]:
    spec = importlib.util.spec_from_file_location("schemas", SCHEMAS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCHEMAS


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    llm = LLM(model=FLAGS.model, max_num_seqs=32)
    cases = schemas()
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content":
               f"Answer in JSON. Give an example of: {json.dumps(s)[:200]}"}]) for s in cases]
    outputs = llm.generate(prompts, [SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0,
                                                    json_schema=s) for s in cases])
    scored = llm.generate([o.prompt_token_ids + o.token_ids for o in outputs],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    report = header("constraint_acceptance", model=FLAGS.model, rows=[])
    grammar = llm.engine.structured.grammar
    for schema, out, score in zip(cases, outputs, scored, strict=True):
        start = len(out.prompt_token_ids)
        ranks = [score.prompt_logprobs[start + j][t].rank for j, t in enumerate(out.token_ids)]
        # How many tokens the constraint allowed at each position (1: the token was forced).
        matcher = grammar.matcher(SamplingParams(json_schema=schema))
        allowed = []
        for t in out.token_ids:
            allowed.append(int(np.unpackbits(grammar.mask(1, [(matcher, 0)]).view(np.uint8))
                               .sum()))
            matcher.consume_token(t)
        free = [r for r, a in zip(ranks, allowed, strict=True) if a > 1]
        report["rows"].append({"schema": schema, "tokens": len(ranks),
                               "accepted": sum(r == 1 for r in ranks),
                               "forced": len(ranks) - len(free),
                               "accepted_unforced": sum(r == 1 for r in free),
                               "first_rejection": next((j for j, r in enumerate(ranks) if r > 1),
                                                       None)})
    rows = report["rows"]
    tokens, accepted = sum(r["tokens"] for r in rows), sum(r["accepted"] for r in rows)
    forced = sum(r["forced"] for r in rows)
    unforced_accepted = sum(r["accepted_unforced"] for r in rows)
    report.update(tokens=tokens, accepted=accepted, acceptance=accepted / tokens,
                  forced=forced, unforced_acceptance=unforced_accepted / (tokens - forced),
                  rejected_at_position_0=sum(r["first_rejection"] == 0 for r in rows))
    write(report, FLAGS.output)
    print(f"{FLAGS.model}, {len(cases)} JSON schemas, greedy, {tokens} constrained tokens: "
          f"{accepted / tokens:.1%} are the unconstrained argmax; {forced} were forced (one token "
          f"allowed), and of the rest {unforced_accepted / (tokens - forced):.1%} are the argmax; "
          f"{report['rejected_at_position_0']} outputs are rejected at their first token")
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
