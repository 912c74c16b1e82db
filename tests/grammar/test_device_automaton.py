"""Device automata against llguidance on SmolLM2's vocabulary: the same token masks along
random walks (forced bytes' tokenization included), the same next states on host and device,
and the text complete exactly where llguidance stops its matcher."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import SamplingParams
from dendrite_jax.grammar.automaton import (
    BROKEN,
    COMPLETE,
    AutomatonArena,
    AutomatonCursor,
    write_automaton,
)
from dendrite_jax.grammar.device_automaton import (
    AutomatonTables,
    Vocabulary,
    automaton_step,
    fill_token_table,
)
from tests.grammar.schemas import SCHEMAS

CONSTRAINTS = [dict(regex=r"(?s:.)*"), dict(regex=r"[0-9]{3}-[0-9]{4}|\s+[^\s]"),
               dict(regex=r"[a-zé ]{2,10}!"),
               dict(regex=r"(foo|bar)+baz"), dict(regex=r'\["[^"\\]{3,12}"(,"[^"\\]{3,12}"){3}\]'),
               dict(regex=r"hello world[0-9]+"), dict(regex=r"(green|blue)[a-z]+ (yes|no)"),
               dict(regex=r'\{"name":"[a-z]{1,8}","count":[0-9]{1,2}\}'),
               dict(regex=r"(?:\u00e9|\x41|[\u{1F600}-\u{1F64F}])+"), dict(regex=r"[^\n]{0,20}\n"),
               dict(choice=["red", "green", "blue", "réd 🚀"]),
               dict(choice=["alpha", "alphabet", "beta"])]
CAPACITY = 2048
JSON_SCHEMAS = (0, 5, 7, 9, 13, 14, 15, 25)  # of tests.grammar.schemas.SCHEMAS, in the default run
JSON_EXTRAS = [{"type": "integer", "minimum": -5, "maximum": 5},
               {"type": "integer", "minimum": -120, "maximum": -7},
               {"type": "integer", "exclusiveMinimum": 16},
               {"type": "array", "items": {"type": "number"}, "maxItems": 3},
               {"type": "string", "minLength": 2, "maxLength": 3},
               {"enum": ["red", "gr\u00e9en", 3, None, True]},
               {"type": ["string", "null"]},
               {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}]
BENCHMARK_SCHEMAS = [  # benchmarks/structured_output.py's SCHEMA and RECORDS
    {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 12},
     "minItems": 40, "maxItems": 40},
    {"type": "array", "minItems": 20, "maxItems": 20, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "color", "count"],
        "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 12},
                       "color": {"enum": ["red", "green", "blue"]},
                       "count": {"type": "integer", "minimum": 0, "maximum": 99}}}}]


@pytest.fixture(scope="module")
def device(smollm):
    compiler = smollm.engine.structured.compiler()
    vocab = Vocabulary.create(compiler.vocabulary.token_bytes)
    return (compiler, vocab, smollm.model.config.vocab_size, jax.jit(fill_token_table),
            jax.jit(automaton_step))


@pytest.mark.parametrize("constraint", CONSTRAINTS, ids=lambda c: str(next(iter(c.values()))))
def test_masks_equal_llguidance_along_random_walks(device, constraint):
    assert_walks_match(device, SamplingParams(max_tokens=8, **constraint))


@pytest.mark.parametrize("schema", [SCHEMAS[i] for i in JSON_SCHEMAS] + JSON_EXTRAS,
                         ids=lambda s: json.dumps(s)[:60])
def test_json_schema_masks_equal_llguidance_along_random_walks(device, schema):
    assert_walks_match(device, SamplingParams(max_tokens=8, json_schema=schema), steps=60)


@pytest.mark.slow
@pytest.mark.parametrize("schema", [s for i, s in enumerate(SCHEMAS) if i not in JSON_SCHEMAS]
                         + BENCHMARK_SCHEMAS, ids=lambda s: json.dumps(s)[:60])
def test_every_regular_schema_masks_equal_llguidance(device, schema):
    """The rest of the structured-output tests' schemas and the benchmark's (up to 13,562
    states); those outside `json_regex`'s subset are skipped."""
    automaton = device[0].automaton(SamplingParams(max_tokens=8, json_schema=schema))
    if isinstance(automaton, str):
        pytest.skip(automaton)
    assert_walks_match(device, SamplingParams(max_tokens=8, json_schema=schema), steps=80,
                       capacity=16384)


def assert_walks_match(device, params, walks: int = 4, steps: int = 40,
                       capacity: int = CAPACITY) -> None:
    """Random walks through the constraint, biased to long tokens: at every position the
    device's mask equals llguidance's, host and device agree on the next state, and the text
    is complete exactly where llguidance stops its matcher."""
    compiler, vocab, vocab_size, fill, step = device
    automaton = compiler.automaton(params)
    assert not isinstance(automaton, str), automaton
    arena = AutomatonArena(capacity)
    arena.place(compiler.automaton(SamplingParams(max_tokens=8, regex="x+y")), set)
    base, new = arena.place(automaton, set)  # a second block: states are offset
    assert new and base > 1
    tables = write_automaton(
        AutomatonTables.create(capacity, vocab_size, compiler.vocabulary.end_tokens), vocab,
        fill, automaton, base)
    token_bytes = compiler.vocabulary.token_bytes
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(walks):
        matcher, cursor = compiler.matcher(params), AutomatonCursor(automaton, base)
        for _ in range(steps):
            expected = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8),
                                     bitorder="little")[:vocab_size].astype(bool)
            allowed, ends = step(tables, jnp.asarray([cursor.device_state], jnp.int32))
            np.testing.assert_array_equal(np.asarray(allowed[0]), expected)
            checked += 1
            choices = np.flatnonzero(expected)
            token = int(rng.choice(choices))
            if rng.random() < 0.5:  # the longest allowed tokens reach deeper states
                lengths = np.array([len(token_bytes[c]) for c in choices]) + rng.random(len(choices))
                token = int(choices[np.argmax(lengths)])
            verdict = cursor.advance(token)
            assert matcher.consume_token(token) and verdict != BROKEN
            if token not in compiler.vocabulary.end_tokens:
                assert int(ends[0, token]) == cursor.device_state  # host and device agree
            assert (verdict == COMPLETE) == matcher.is_stopped()
            if verdict == COMPLETE:
                break
    assert checked >= 4


def test_a_token_off_the_constraint_breaks_the_cursor(device):
    compiler = device[0]
    automaton = compiler.automaton(SamplingParams(max_tokens=8, regex=r"[0-9]+"))
    cursor = AutomatonCursor(automaton, 1)
    digit = compiler.vocabulary.token_bytes.index(b"7")
    letter = compiler.vocabulary.token_bytes.index(b"a")
    end = next(iter(compiler.vocabulary.end_tokens))
    assert cursor.advance(digit) is None
    assert cursor.advance(letter) == BROKEN
    assert AutomatonCursor(automaton, 1).advance(end) == BROKEN  # nothing matched yet
    assert cursor.advance(end) == COMPLETE


def test_unsupported_constraints_say_why(device):
    compiler = device[0]
    assert "any JSON" in compiler.automaton(SamplingParams(max_tokens=8, json_schema={}))
    assert "additionalProperties" in compiler.automaton(
        SamplingParams(max_tokens=8, json_schema={"type": "object", "properties": {}}))
    assert "minimum" in compiler.automaton(
        SamplingParams(max_tokens=8, json_schema={"type": "number", "minimum": 0}))
    assert "anchor" in compiler.automaton(SamplingParams(max_tokens=8, regex=r"^a"))
    assert "escape" in compiler.automaton(SamplingParams(max_tokens=8, regex=r"\d+"))
    assert "llguidance" in compiler.automaton(SamplingParams(max_tokens=8, grammar='start: "a"'))


def test_arena_reuses_blocks_and_evicts_unused_grammars(device):
    compiler = device[0]
    small = [compiler.automaton(SamplingParams(max_tokens=8, regex=f"{w}[0-9]")) for w in "abc"]
    arena = AutomatonArena(1 + 2 * small[0].dfa.num_states)
    first = arena.place(small[0], set)
    assert arena.place(small[0], set) == (first[0], False)
    assert arena.place(small[1], set)[1]
    assert arena.place(small[2], lambda: {small[0].key, small[1].key}) is None  # all in use
    base, new = arena.place(small[2], lambda: {small[0].key})
    assert new and base == first[0] + small[0].dfa.num_states  # small[1]'s block went
    with pytest.raises(ValueError, match="automaton_states"):
        AutomatonArena(1)
