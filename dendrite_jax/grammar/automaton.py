"""Host side of device automata: a grammar's token-level view, a request's cursor in it, and the
arena that lays every grammar in use into the device's one table of states.

The device steps a constrained row by itself (`device_automaton`); the host still follows each
request through the tokens it reads back, with the same automaton, for three reasons: to finish
the request where the constraint is complete (as llguidance stops a matcher), to start a row
whose state the device does not hold (a request new to its slot, or recomputed), and to catch
a token that breaks the constraint.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from dendrite_jax.grammar.byte_dfa import ByteDfa
from dendrite_jax.grammar.device_automaton import (
    DEAD,
    FILL_ROWS,
    PAD_BYTE,
    AutomatonTables,
    Vocabulary,
)

COMPLETE, BROKEN = "complete", "broken"
MAX_FORCED_BYTES = 1024
CHOP_LOOKBACK = 4  # tokens at the end of forced bytes that a longer token may replace


class TokenBytes:
    """The vocabulary as llguidance reads it: each token's bytes (b"" for special tokens), the
    end-of-text tokens, the tokenizer, and which tokens extend a given byte string."""

    def __init__(self, token_bytes: list[bytes], end_tokens: frozenset[int],
                 tokenize: Callable[[bytes], list[int]]) -> None:
        self.token_bytes = token_bytes
        self.end_tokens = end_tokens
        self.tokenize = tokenize
        self.max_length = max(len(b) for b in token_bytes)
        self._by_prefix: dict[bytes, list[bytes]] | None = None

    def extensions(self, prefix: bytes) -> list[bytes]:
        """The tokens (as bytes) that start with `prefix` and are longer."""
        if self._by_prefix is None:
            self._by_prefix = {}
            for data in set(self.token_bytes):
                for n in range(1, len(data)):
                    self._by_prefix.setdefault(data[:n], []).append(data)
        return self._by_prefix.get(prefix, [])


class TokenAutomaton:
    """A constraint's byte DFA read token by token (transitions memoized per (state, token)).

    Where the constraint forces bytes (one way on, not accepting), llguidance allows only the
    first of the tokens its tokenizer makes of them, unless a longer token could cover their
    end and what may follow (then every token that fits is allowed). `forced` holds that one
    token per state, so the device's masks equal llguidance's.
    """

    def __init__(self, key: str, dfa: ByteDfa, vocabulary: TokenBytes) -> None:
        self.key = key
        self.dfa = dfa
        self.complete = dfa.complete
        self.end_tokens = vocabulary.end_tokens
        self._vocabulary = vocabulary
        self._next: dict[tuple[int, int], int] = {}
        self.forced = self._forced_tokens()

    def next_state(self, state: int, token: int) -> int:
        """The state after `token`, or -1 where the token breaks the constraint."""
        key = (state, token)
        nxt = self._next.get(key)
        if nxt is None:
            data = self._vocabulary.token_bytes[token]
            nxt = self.dfa.walk(state, data) if data else -1
            self._next[key] = nxt
        return nxt

    def _forced_tokens(self) -> dict[int, int]:
        """state -> the one token llguidance allows there (states that force bytes)."""
        dfa = self.dfa
        alive = dfa.transitions >= 0
        single = (alive.sum(axis=1) == 1) & ~dfa.accepting
        forced: dict[int, int] = {}
        for state in np.flatnonzero(single).tolist():
            data, end = bytearray(), state
            while single[end] and len(data) < MAX_FORCED_BYTES:
                byte = int(np.flatnonzero(alive[end])[0])
                data.append(byte)
                end = int(dfa.transitions[end, byte])
            tokens = self._vocabulary.tokenize(bytes(data))
            tokens = tokens[:len(tokens) - self._chop(tokens, end)]
            if tokens:
                forced[state] = tokens[0]
        return forced

    def _chop(self, tokens: list[int], state: int) -> int:
        """How many of the forced bytes' last tokens to drop because a longer token could
        cover their end and continue as the constraint allows from `state`."""
        vocab = self._vocabulary
        tail = tokens[-CHOP_LOOKBACK:]
        data = b"".join(vocab.token_bytes[t] for t in tail)[-vocab.max_length:]
        for start in range(len(data)):
            suffix = data[start:]
            if any(self.dfa.walk(state, token[len(suffix):]) >= 0
                   for token in vocab.extensions(suffix)):
                covered = 0
                for count, t in enumerate(reversed(tail), start=1):
                    covered += len(vocab.token_bytes[t])
                    if covered >= len(suffix):
                        return count
        return 0


class AutomatonCursor:
    """One request's state in its constraint's automaton, advanced by its tokens."""

    def __init__(self, automaton: TokenAutomaton, base: int) -> None:
        self.automaton = automaton
        self.base = base  # where the automaton's states start in the device table
        self.state = 0

    @property
    def device_state(self) -> int:
        return self.base + self.state

    def advance(self, token: int) -> str | None:
        """Take a generated token: COMPLETE where the text is finished (an end-of-text token
        where the state accepts, or a state nothing can follow), BROKEN where the token
        breaks the constraint, else None."""
        a = self.automaton
        if token in a.end_tokens:
            return COMPLETE if a.dfa.accepting[self.state] else BROKEN
        nxt = a.next_state(self.state, token)
        if nxt < 0:
            return BROKEN
        self.state = nxt
        return COMPLETE if a.complete[nxt] else None


class AutomatonArena:
    """Blocks of the device's automaton table (`device_automaton.AutomatonTables`): one per
    grammar placed, state 0 dead. The host side of the table: where each grammar sits."""

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f"automaton_states must be at least 2, got {capacity}")
        self.capacity = capacity
        self.blocks: dict[str, tuple[int, int]] = {}  # key -> (base, size)

    def place(self, automaton: TokenAutomaton,
              in_use: Callable[[], set[str]]) -> tuple[int, bool] | None:
        """(base of `automaton`'s block, whether the block is new and must be written). Blocks
        of grammars no live request uses (`in_use`) make room; None where it still does not
        fit (the request then runs with its llguidance matcher)."""
        if automaton.key in self.blocks:
            return self.blocks[automaton.key][0], False
        size = automaton.dfa.num_states
        base = self._gap(size)
        if base is None:
            keep = in_use()
            self.blocks = {k: b for k, b in self.blocks.items() if k in keep}
            base = self._gap(size)
        if base is None:
            return None
        self.blocks[automaton.key] = (base, size)
        return base, True

    def _gap(self, size: int) -> int | None:
        start = 1  # state 0 is the dead state
        for base, used in sorted(self.blocks.values()):
            if base - start >= size:
                return start
            start = base + used
        return start if self.capacity - start >= size else None


def write_automaton(tables: AutomatonTables, vocab: Vocabulary, fill,
                    automaton: TokenAutomaton, base: int) -> AutomatonTables:
    """`tables` with `automaton`'s states written at `base`: `fill` (the jitted
    `device_automaton.fill_token_table`) walks the vocabulary from FILL_ROWS states a call."""
    capacity = tables.accepting.shape[0]
    table, accepting = (jnp.asarray(a) for a in _padded_byte_table(automaton.dfa, capacity))
    for start in range(0, automaton.dfa.num_states, FILL_ROWS):
        rows = np.arange(start, start + FILL_ROWS, dtype=np.int32)
        rows[rows >= automaton.dfa.num_states] = -1
        forced = np.array([automaton.forced.get(int(r), -1) for r in rows], np.int32)
        tables = fill(tables, vocab, table, accepting, rows, forced, np.int32(base))
    return tables


def _padded_byte_table(dfa: ByteDfa, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """`dfa` as `device_automaton.fill_token_table` reads it: [capacity, 257] transitions and
    [capacity] accepting, local state s at row s + 1, row 0 dead."""
    n = dfa.num_states
    table = np.zeros((capacity, PAD_BYTE + 1), np.int32)
    table[1:n + 1, :PAD_BYTE] = np.where(dfa.transitions >= 0, dfa.transitions + 1, DEAD)
    table[1:n + 1, PAD_BYTE] = np.arange(1, n + 1)
    accepting = np.zeros(capacity, bool)
    accepting[1:n + 1] = dfa.accepting
    return table, accepting


__all__ = ["BROKEN", "COMPLETE", "AutomatonArena", "AutomatonCursor", "TokenAutomaton", "TokenBytes",
           "write_automaton"]
