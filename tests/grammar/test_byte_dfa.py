"""Byte DFAs against Python's `re` on random text, and the UTF-8 range splitting."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.grammar.byte_dfa import compile_tree, utf8_sequences
from dendrite_jax.grammar.regex_syntax import UnsupportedPattern, parse

# Patterns whose meaning `re` shares with llguidance's (Rust) syntax on this alphabet.
PATTERNS = [r"ab(c)?", r"[a-c]{2,4}x", r"(foo|ba[rz])+q?", r"[^a\n]*b", r"a.{0,3}c",
            r"(?s:.)*", r"[0-9]{2}-[0-9]\s?a", r"[é-ü]+\u00e9|\x41{2}", r"(?:xy|x)*y", r"[]a]b*|[^]]"]
ALPHABET = st.sampled_from(list("abcqxyz\n -0123456789éñüA]") + ["٣", "🙂", "\u2003"])


def accepts(dfa, text: str) -> bool:
    state = dfa.walk(0, text.encode())
    return state >= 0 and bool(dfa.accepting[state])


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=300, deadline=None)
@given(text=st.lists(ALPHABET, max_size=8).map("".join))
def test_dfa_accepts_what_re_fullmatches(pattern, text):
    dfa = compile_tree(parse(pattern))
    assert accepts(dfa, text) == bool(re.fullmatch(pattern, text, re.DOTALL if "(?s" in pattern
                                                    else 0))


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=200, deadline=None)
@given(text=st.lists(ALPHABET, max_size=6).map("".join))
def test_a_walk_stays_alive_exactly_on_prefixes_of_matches(pattern, text):
    """Alive means some completion matches: every prefix of an accepted text is alive, and an
    alive state can reach acceptance (the construction cuts the rest)."""
    dfa = compile_tree(parse(pattern))
    data = text.encode()
    if accepts(dfa, text):
        assert all(dfa.walk(0, data[:n]) >= 0 for n in range(len(data) + 1))
    state = dfa.walk(0, data)
    if state >= 0:
        assert dfa.accepting[state] or (dfa.transitions[state] >= 0).any()


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(0, 0x10FFFF), span=st.integers(0, 5000))
def test_utf8_sequences_cover_exactly_the_range(lo, span):
    hi = min(lo + span, 0x10FFFF)
    if lo <= 0xDFFF and hi >= 0xD800:
        return  # the surrogates never reach here (regex_syntax.normalize cuts them)
    seqs = utf8_sequences(lo, hi)

    def covered(data: bytes) -> bool:
        return any(len(s) == len(data) and all(a <= b <= c for (a, c), b in zip(s, data, strict=True))
                   for s in seqs)
    for cp in {lo, hi, (lo + hi) // 2, max(lo - 1, 0), min(hi + 1, 0x10FFFF)}:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        assert covered(chr(cp).encode()) == (lo <= cp <= hi), hex(cp)


@pytest.mark.parametrize("pattern", [r"^a", r"a$", r"\w+", r"\d", r"(?i)a", r"[[a]]", r"a\b", r"\p{L}",
                                     r"[a&&b]", r"a{2,1}", r"(a", r"\<a"])
def test_patterns_outside_the_syntax_are_refused(pattern):
    with pytest.raises(UnsupportedPattern):
        compile_tree(parse(pattern))


def test_a_pattern_that_matches_nothing_is_refused():
    with pytest.raises(UnsupportedPattern, match="matches no text"):
        compile_tree(parse(r"[^\x00-\u{10FFFF}]"))


def test_complete_states_are_accepting_dead_ends():
    dfa = compile_tree(parse("ab(c)?"))
    assert not dfa.complete[dfa.walk(0, b"ab")]  # "c" may follow
    assert dfa.complete[dfa.walk(0, b"abc")]
    assert dfa.walk(0, b"ad") == -1
