"""Golden cases: seeded runs on the real SmolLM2 (float32, CPU) whose exact outputs are recorded
under tests/golden/*.json and compared on every test run.

A change that moves any of these tokens must be deliberate: regenerate with
`python -m tests.golden.regenerate` and review the diff of the JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path

from dendrite_jax import BeamSearchParams, SamplingParams

GOLDEN_DIR = Path(__file__).parent
PROMPTS = ["The history of printing begins", "def fibonacci(n):", "My favourite season is",
           "In 1969, astronauts", "The recipe calls for"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rank"],
          "properties": {"city": {"type": "string", "maxLength": 14},
                         "rank": {"type": "integer", "minimum": 1, "maximum": 10}}}


def _sampling() -> list[tuple[str, SamplingParams]]:
    settings = [
        dict(temperature=0),
        dict(temperature=0.8, seed=1),
        dict(temperature=1.0, top_k=20, seed=2),
        dict(temperature=1.0, top_p=0.9, seed=3),
        dict(temperature=1.0, min_p=0.1, seed=4),
        dict(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=5),
        dict(temperature=0.9, frequency_penalty=1.0, seed=6),
    ]
    # The first two share a prompt: greedy, then sampled.
    return [(PROMPTS[max(i - 1, 0) % len(PROMPTS)], SamplingParams(max_tokens=16, **s))
            for i, s in enumerate(settings)]


def _constrained() -> list[tuple[str, SamplingParams]]:
    chat = "<|im_start|>user\nName a city and rank it from 1 to 10 as JSON.<|im_end|>\n" \
           "<|im_start|>assistant\n"
    return [
        (chat, SamplingParams(max_tokens=40, temperature=0, json_schema=SCHEMA)),
        (chat, SamplingParams(max_tokens=40, temperature=1.0, seed=7, json_schema=SCHEMA)),
        (chat, SamplingParams(max_tokens=40, temperature=1.0, seed=8, json_schema=SCHEMA)),
        (PROMPTS[3], SamplingParams(max_tokens=20, temperature=1.0, seed=9,
                                    regex=r" [A-Z][a-z]+( [a-z]+){2,4}\.")),
        (PROMPTS[2], SamplingParams(max_tokens=8, temperature=1.0, seed=10,
                                    choice=[" spring", " summer", " autumn", " winter"])),
    ]


def _generate(requests) -> callable:
    def run(llm) -> list[dict]:
        """The requests in one continuously batched run: each output's tokens and text."""
        prompts, params = zip(*requests(), strict=True)
        outputs = llm.generate(list(prompts), list(params))
        return [{"prompt": p, "token_ids": o.token_ids, "text": o.text,
                 "finish_reason": o.finish_reason} for p, o in zip(prompts, outputs, strict=True)]
    return run


def _beams(llm) -> list[dict]:
    """Beam search on two prompts at once; scores rounded to 1e-3."""
    prompts = [PROMPTS[0], PROMPTS[4]]
    outputs = llm.beam_search(prompts, BeamSearchParams(beam_width=3, max_tokens=12))
    return [{"prompt": p, "token_ids": s.token_ids, "text": s.text, "score": round(s.score, 3)}
            for p, o in zip(prompts, outputs, strict=True) for s in o.sequences]


def _constrained_beams(llm) -> list[dict]:
    """Beam search under the JSON schema: every beam follows its own matcher."""
    prompt = _constrained()[0][0]
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=40,
                                                     json_schema=SCHEMA))[0]
    return [{"prompt": prompt, "token_ids": s.token_ids, "text": s.text,
             "score": round(s.score, 3)} for s in out.sequences]


CASES = {"sampling": _generate(_sampling), "constrained": _generate(_constrained),
         "beams": _beams, "constrained_beams": _constrained_beams}


def run_case(llm, name: str) -> list[dict]:
    return CASES[name](llm)


def dumps(records: list[dict]) -> str:
    """One record per line, so a changed output shows as a changed line."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def load(name: str) -> list[dict]:
    return json.loads(golden_path(name).read_text())
