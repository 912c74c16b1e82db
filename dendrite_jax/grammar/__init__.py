"""Structured output: llguidance matchers on the host, a packed token bitmask applied on device;
or, for regular constraints, automata the device steps itself (`device_automaton`)."""

from dendrite_jax.grammar.mask import allowed_tokens, mask_words
from dendrite_jax.grammar.matcher import GrammarCompiler, GrammarError, grammar_spec

__all__ = ["GrammarCompiler", "GrammarError", "allowed_tokens", "grammar_spec", "mask_words"]
