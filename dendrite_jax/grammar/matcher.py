"""Grammar matchers: one llguidance tokenizer per model (built once), one matcher per request.

A request's constraint (`SamplingParams` json_schema, regex, Lark grammar or choice) becomes an
llguidance grammar; a grammar llguidance rejects raises `GrammarError` with llguidance's message.
JSON schemas are compiled without free whitespace (compact JSON) unless the schema's
"x-guidance" options say otherwise: a small model given free whitespace can emit newlines until
it runs out of tokens.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.numpy
import numpy as np

from dendrite_jax.engine.sampling_params import CONSTRAINTS, SamplingParams
from dendrite_jax.grammar.mask import allow_all
from dendrite_jax.model.tokenizer import Tokenizer

JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A constraint that llguidance cannot compile (the message is llguidance's)."""


def grammar_spec(params: SamplingParams) -> str | None:
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

    def matcher(self, params: SamplingParams) -> llguidance.LLMatcher | None:
        """A fresh matcher for the request's constraint (None if unconstrained)."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        matcher = llguidance.LLMatcher(self._tokenizer, spec, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {constraint_name(params)}: {matcher.get_error()}")
        return matcher

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


def constraint_name(params: SamplingParams) -> str:
    return next((n for n in CONSTRAINTS if getattr(params, n) is not None), "constraint")
