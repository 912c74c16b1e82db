"""Grammar matchers: one llguidance tokenizer per model (built once), one matcher per request.

A request's constraint (json_schema, regex, Lark grammar or choice: `constraint.Constrained`,
as `SamplingParams` and `BeamSearchParams` carry it) becomes an llguidance grammar; a grammar
llguidance rejects raises `GrammarError` with llguidance's message.
JSON schemas are compiled without free whitespace (compact JSON) unless the schema's
"x-guidance" options say otherwise: a small model given free whitespace can emit newlines until
it runs out of tokens.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.numpy
import numpy as np

from dendrite_jax.grammar import regex_syntax
from dendrite_jax.grammar.automaton import TokenAutomaton, TokenBytes
from dendrite_jax.grammar.byte_dfa import compile_tree
from dendrite_jax.grammar.constraint import CONSTRAINTS, Constrained
from dendrite_jax.grammar.json_regex import schema_tree
from dendrite_jax.grammar.mask import allow_all
from dendrite_jax.model.tokenizer import Tokenizer

JSON_DEFAULTS = {"whitespace_flexible": False}
MAX_CACHED_CONSTRAINTS = 64


class GrammarError(ValueError):
    """A constraint that llguidance cannot compile (the message is llguidance's)."""


def grammar_spec(params: Constrained) -> str | None:
    """The llguidance grammar for a request's constraint, or None if it has none."""
    if params.json_schema is not None:
        schema = params.json_schema
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise GrammarError(f"json_schema is not valid JSON: {e}") from e
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.grammar is not None:
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)
    if params.choice is not None:
        options = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {options}")
    return None


class GrammarCompiler:
    """Builds matchers for one model's tokenizer; fills mask rows for many matchers at once."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size,
            eos_token=list(tokenizer.stop_token_ids))
        self._executor = llguidance.LLExecutor()
        # Each token's bytes as llguidance reads them (special tokens: none), for automata.
        self.vocabulary = TokenBytes(
            [b"" if self._tokenizer.is_special_token(t) else self._tokenizer.decode_bytes([t])
             for t in range(vocab_size)],
            frozenset(tokenizer.stop_token_ids), self._tokenizer.tokenize_bytes)
        # Per constraint (`constraint_key`), most recently used last: the automaton, or why
        # there is none, or llguidance's error.
        self._automata: dict[str, TokenAutomaton | str | GrammarError] = {}

    def matcher(self, params: Constrained) -> llguidance.LLMatcher | None:
        """A fresh matcher for the request's constraint (None if unconstrained); raises
        GrammarError with llguidance's message for a constraint it rejects. Built anew for
        each request: copies of one matcher (`deep_copy`) fill their masks in parallel far
        more slowly than matchers built apart."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        matcher = llguidance.LLMatcher(self._tokenizer, spec, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {constraint_name(params)}: {matcher.get_error()}")
        return matcher

    def automaton(self, params: Constrained) -> TokenAutomaton | str:
        """The constraint as a token automaton the device can step (`device_automaton`), or
        the reason it has none: Lark grammars, patterns outside `regex_syntax` and schemas
        outside `json_regex` stay with llguidance. Built once per constraint, after llguidance
        accepts it (else GrammarError, as `matcher`): requests that use it need no matcher."""
        key = constraint_key(params)
        found = self._automata.pop(key, None)
        if found is None:
            try:
                self.matcher(params)
                found = self._build_automaton(key, params)
            except GrammarError as e:
                found = e
        self._automata[key] = found  # most recently used last
        while len(self._automata) > MAX_CACHED_CONSTRAINTS:
            self._automata.pop(next(iter(self._automata)))
        if isinstance(found, GrammarError):
            raise found
        return found

    def _build_automaton(self, key: str, params: Constrained) -> TokenAutomaton | str:
        name = constraint_name(params)
        try:
            if params.regex is not None:
                tree = regex_syntax.parse(params.regex)
            elif params.choice is not None:
                tree = ("alt", [regex_syntax.literal(c) for c in params.choice])
            elif params.json_schema is not None:
                tree = schema_tree(params.json_schema)
            else:
                return f"{name} constraints run with llguidance"
            return TokenAutomaton(key, compile_tree(tree), self.vocabulary)
        except regex_syntax.UnsupportedPattern as e:
            return f"{name}: {e}"

    def mask(self, num_rows: int, rows: list[tuple[llguidance.LLMatcher, int]]) -> np.ndarray:
        """A step's token mask [num_rows, words]: each (matcher, row)'s allowed next tokens,
        filled in parallel; other rows allow every token."""
        mask = allow_all(num_rows, self.vocab_size)
        if rows:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, mask)
        return mask

    def consume(self, pairs: list[tuple[llguidance.LLMatcher, int]]) -> list[bool]:
        """Advance each matcher by its token, in parallel; False where the token breaks the
        matcher's constraint (the matcher is then in its error state, as `consume_token`
        leaves it)."""
        return self._executor.consume_token_par(pairs)


def forced_token(matcher: llguidance.LLMatcher) -> int | None:
    """The one token `matcher` allows next (which may be EOS: the caller decides), or None
    where it allows several. The forced-bytes check first is cheap and rules out most
    positions without a mask."""
    if not matcher.compute_ff_bytes():
        return None
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
    allowed = np.flatnonzero(bits)
    return int(allowed[0]) if allowed.size == 1 else None


def constraint_key(params: Constrained) -> str:
    """Requests with equal keys have the same constraint."""
    name = constraint_name(params)
    value = json.dumps(getattr(params, name), sort_keys=True, ensure_ascii=False, default=str)
    return f"{name}:{value}"


def constraint_name(params: Constrained) -> str:
    return next((n for n in CONSTRAINTS if getattr(params, n) is not None), "constraint")
