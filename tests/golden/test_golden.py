"""Seeded runs (sampling, constrained, beams, constrained beams) reproduce their outputs exactly.

`python -m tests.golden.regenerate` rewrites the records when a change is deliberate."""

from __future__ import annotations

import json

import pytest

from tests.golden.cases import CASES, load, run_case


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden(smollm, name):
    expected = load(name)
    actual = run_case(smollm, name)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got == want, f"{name}: {want['prompt']!r} changed; if intended, regenerate"


def test_goldens_are_not_degenerate():
    """The records exercise what they claim: sampled runs differ from greedy, constraints hold."""
    sampling = load("sampling")
    assert sampling[0]["prompt"] == sampling[1]["prompt"]
    assert sampling[0]["token_ids"] != sampling[1]["token_ids"]  # greedy vs seeded sample
    assert all(len(r["token_ids"]) == 16 for r in sampling)
    constrained = load("constrained")
    assert all(r["finish_reason"] == "stop" for r in constrained)
    assert len({r["text"] for r in constrained[:3]}) > 1  # seeds give different JSON
    beams = load("beams")
    assert len(beams) == 6 and len({tuple(r["token_ids"]) for r in beams[:3]}) == 3
    constrained_beams = load("constrained_beams")
    assert len({tuple(r["token_ids"]) for r in constrained_beams}) == 3
    for r in constrained_beams:  # each hypothesis is complete, valid JSON
        value = json.loads(r["text"])
        assert set(value) == {"city", "rank"} and 1 <= value["rank"] <= 10
