"""Beam search under a constraint, on the real SmolLM2: every beam follows its own matcher, so
each hypothesis satisfies the constraint, and scores stay the model's own log-probabilities
(checked against transformers)."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from dendrite_jax import BeamSearchParams
from dendrite_jax.grammar import GrammarError

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def hf_score(hf_smollm, prompt: list[int], generated: list[int], length_penalty: float) -> float:
    """transformers' beam score of a finished hypothesis: summed log-probabilities of its
    tokens under the unconstrained model / generated length ** length_penalty."""
    model, _ = hf_smollm
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    total = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(generated))
    return total / len(generated) ** length_penalty


def test_choice_beams_are_the_choices_with_model_scores(smollm, hf_smollm):
    choices = ["Paris", "London", "Rome"]
    ids = smollm.tokenizer.encode(CHAT.format("Name a European capital city."))
    params = BeamSearchParams(beam_width=3, max_tokens=8, choice=choices)
    out = smollm.beam_search([ids], params)[0]
    eos = set(smollm.tokenizer.stop_token_ids)
    assert sorted(smollm.tokenizer.decode([t for t in s.token_ids if t not in eos])
                  for s in out.sequences) == sorted(choices)
    for s in out.sequences:
        assert s.token_ids[-1] in eos  # each ends where its choice is complete
        assert math.isclose(s.score, hf_score(hf_smollm, ids, s.token_ids, 1.0),
                            rel_tol=1e-3, abs_tol=1e-3)
    assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences),
                                                      reverse=True)
    assert smollm.stats().pool.used == 0


def test_json_schema_and_regex_beams_are_valid(smollm):
    schema = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 12},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    eos = set(smollm.tokenizer.stop_token_ids)
    prompts = [CHAT.format("Describe a person as JSON with name and age."),
               CHAT.format("Give me a made-up person in JSON.")]
    outs = smollm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=40,
                                                        json_schema=schema))
    for out in outs:
        assert len(out.sequences) == 4
        assert len({tuple(s.token_ids) for s in out.sequences}) == 4  # distinct hypotheses
        for s in out.sequences:
            assert s.token_ids[-1] in eos
            jsonschema.validate(json.loads(smollm.tokenizer.decode(s.token_ids[:-1])), schema)
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    out = smollm.beam_search([CHAT.format("What is a phone number for a pizza shop?")],
                             BeamSearchParams(beam_width=3, max_tokens=24, regex=phone))[0]
    for s in out.sequences:
        assert re.fullmatch(phone, smollm.tokenizer.decode(s.token_ids[:-1]))
    assert smollm.stats().pool.used == 0


def test_invalid_constraint_raises_before_running(smollm):
    with pytest.raises(GrammarError, match="regex"):
        smollm.beam_search(["Hello"], BeamSearchParams(beam_width=2, regex="(unclosed"))
    with pytest.raises(ValueError, match="at most one of"):
        BeamSearchParams(regex="a+", choice=["a"])
    assert smollm.stats().pool.used == 0
    assert not smollm.engine.has_unfinished()
