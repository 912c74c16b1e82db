"""Token masks on the device: regular constraints stepped inside the jitted sampler.

A constrained row normally waits for the host each token: the host reads the sampled token
back, advances the request's llguidance matcher and fills the next mask. For a constraint that
is a byte DFA (`byte_dfa`), the device can do all of it. When a grammar is placed, the device
walks every token's bytes from every state of its automaton once (`fill_token_table`), giving a
token-level table: the state each token leads to, DEAD where it breaks the constraint. A step
then reads one row of that table per constrained row: the allowed tokens (alive, plus the
end-of-text tokens where the state accepts) and, for the sampled token, the next state, which
stays in the slot state. Constrained rows decode like free ones, bursts included.

The automata of all grammars in use share one table of fixed capacity (`AutomatonArena`
assigns the blocks); state 0 is the dead state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

DEAD = 0
PAD_BYTE = 256  # a byte column that leaves the state as it is: pads short tokens
NO_AUTOMATON = -1  # a plan row without an automaton (every token allowed)
FROM_SLOT = -2  # a plan row whose automaton state is the slot's, left by its last sample
LENGTH_GROUPS = (8, 16)  # tokens walk in groups by byte length (a group walks its longest)
FILL_ROWS = 64  # automaton states filled per call


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutomatonTables:
    """Every placed automaton, token by token, and what the step needs besides."""

    token_next: jax.Array  # [N, V] int16/int32: the state after each token, DEAD if it breaks
    accepting: jax.Array  # [N] bool
    is_end: jax.Array  # [V] bool: the end-of-text tokens, allowed where the state accepts

    @classmethod
    def create(cls, capacity: int, vocab_size: int,
               end_tokens: frozenset[int]) -> AutomatonTables:
        """An empty table (every state dead) of `capacity` states."""
        dtype = jnp.int16 if capacity <= np.iinfo(np.int16).max else jnp.int32
        is_end = np.zeros(vocab_size, bool)
        is_end[sorted(end_tokens)] = True
        return cls(token_next=jnp.zeros((capacity, vocab_size), dtype),
                   accepting=jnp.zeros((capacity,), bool), is_end=jnp.asarray(is_end))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The vocabulary as bytes, for walking automata."""

    groups: tuple[jax.Array, ...]  # per length group [n, L] int32, PAD_BYTE after the end
    order: jax.Array  # [V] int32: each token's column in the groups laid end to end
    is_text: jax.Array  # [V] bool: tokens with bytes (special tokens have none)

    @classmethod
    def create(cls, token_bytes: list[bytes]) -> Vocabulary:
        """`token_bytes`: b"" for special tokens, which no automaton allows."""
        lengths = np.array([len(b) for b in token_bytes])
        bounds = [b for b in LENGTH_GROUPS if b < lengths.max()] + [int(lengths.max())]
        groups, members_by_group, lo = [], [], -1
        for hi in bounds:
            members = np.flatnonzero((lengths > lo) & (lengths <= hi))
            lo = hi
            table = np.full((members.size, hi), PAD_BYTE, np.int32)
            for row, token in enumerate(members.tolist()):
                table[row, :lengths[token]] = np.frombuffer(token_bytes[token], np.uint8)
            groups.append(jnp.asarray(table))
            members_by_group.append(members)
        order = np.empty(len(token_bytes), np.int32)
        order[np.concatenate(members_by_group)] = np.arange(len(token_bytes), dtype=np.int32)
        return cls(groups=tuple(groups), order=jnp.asarray(order),
                   is_text=jnp.asarray(lengths > 0))


def walk_vocabulary(vocab: Vocabulary, byte_table: jax.Array, states: jax.Array) -> jax.Array:
    """[R, V]: the state after each token's bytes from each of `states` [R], in a byte
    automaton `byte_table` [S, 257] whose state 0 is dead (and stays so)."""
    flat = byte_table.reshape(-1)
    width = byte_table.shape[1]
    ends = []
    for group in vocab.groups:
        def byte(j, current, group=group):
            return flat[current * width + group[:, j][None, :]]
        start = jnp.broadcast_to(states[:, None], (states.shape[0], group.shape[0]))
        ends.append(jax.lax.fori_loop(0, group.shape[1], byte, start))
    return jnp.where(vocab.is_text, jnp.concatenate(ends, axis=1)[:, vocab.order], DEAD)


def fill_token_table(tables: AutomatonTables, vocab: Vocabulary, byte_table: jax.Array,
                     accepting: jax.Array, rows: jax.Array, forced: jax.Array,
                     base: jax.Array) -> AutomatonTables:
    """Write states `rows` [FILL_ROWS] (local ids; -1 pads) of one automaton into the tables at
    `base`; a state with a `forced` token (else -1) allows that token alone
    (`automaton.TokenAutomaton`). `byte_table` [C, 257] is the automaton with local state s at
    row s + 1 (row 0 dead), `accepting` [C] likewise; C is the arena's capacity, so one
    compile serves every automaton."""
    local = jnp.where(rows >= 0, rows + 1, DEAD)
    ends = walk_vocabulary(vocab, byte_table, local)
    only = jnp.arange(ends.shape[1])[None, :] == forced[:, None]
    ends = jnp.where((forced[:, None] < 0) | only, ends, DEAD)
    token_next = jnp.where(ends == DEAD, DEAD, ends - 1 + base).astype(tables.token_next.dtype)
    dest = jnp.where(rows >= 0, base + rows, tables.token_next.shape[0])  # pads: dropped
    return dataclasses.replace(
        tables, token_next=tables.token_next.at[dest].set(token_next, mode="drop"),
        accepting=tables.accepting.at[dest].set(accepting[local], mode="drop"))


def automaton_step(tables: AutomatonTables, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For rows in automaton states [B] (NO_AUTOMATON: free rows): the allowed tokens [B, V]
    and the state each token leads to [B, V] int32."""
    active = states >= 0
    start = jnp.where(active, states, DEAD)
    ends = tables.token_next[start].astype(jnp.int32)
    allowed = (ends != DEAD) | (tables.is_end[None] & tables.accepting[start][:, None])
    return jnp.where(active[:, None], allowed, True), ends


__all__ = ["DEAD", "FILL_ROWS", "FROM_SLOT", "NO_AUTOMATON", "PAD_BYTE", "AutomatonTables",
           "Vocabulary", "automaton_step", "fill_token_table", "walk_vocabulary"]
