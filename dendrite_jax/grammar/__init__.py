"""Structured output: llguidance matchers on the host, a packed token bitmask applied on device."""

from dendrite_jax.grammar.mask import apply_token_mask, mask_words
from dendrite_jax.grammar.matcher import GrammarCompiler, GrammarError, grammar_spec

__all__ = ["GrammarCompiler", "GrammarError", "apply_token_mask", "grammar_spec", "mask_words"]
