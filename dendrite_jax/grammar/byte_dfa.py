"""Byte-level DFAs: a regular constraint (`regex_syntax` tree) as an automaton over UTF-8 bytes.

Text is bytes to the tokenizer, so the automaton reads bytes: a code-point class becomes the
byte sequences of its UTF-8 encodings, and a token is allowed from a state where walking its
bytes stays alive. The construction is the textbook one: a Thompson NFA, subset construction
over byte classes, then every state that can no longer reach an accepting one is cut, so "alive"
means "some completion matches" (llguidance's rule for a token mask).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dendrite_jax.grammar.regex_syntax import UnsupportedPattern

MAX_NFA_STATES = 200_000
MAX_DFA_STATES = 60_000


@dataclasses.dataclass(frozen=True)
class ByteDfa:
    """State 0 starts; from every state some accepting state is reachable."""

    transitions: np.ndarray  # [S, 256] int32: the next state, -1 where no match can follow
    accepting: np.ndarray  # [S] bool

    @property
    def num_states(self) -> int:
        return len(self.accepting)

    @property
    def complete(self) -> np.ndarray:
        """[S] bool: accepting states with no way on: the text is finished."""
        return self.accepting & (self.transitions < 0).all(axis=1)

    def walk(self, state: int, data: bytes) -> int:
        """The state after `data` from `state`, or -1 once no match can follow."""
        for byte in data:
            state = int(self.transitions[state, byte])
            if state < 0:
                break
        return state


def utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The UTF-8 encodings of code points lo..hi (no surrogates) as sequences of byte ranges:
    each sequence matches, byte by byte, a run of code points of one encoded length."""
    out, todo = [], [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        edge = next((e for e in (0x7F, 0x7FF, 0xFFFF) if lo <= e < hi), None)
        if edge is not None:  # split where the encoded length changes
            todo += [(lo, edge), (edge + 1, hi)]
            continue
        n = len(chr(lo).encode())
        for i in range(1, n):  # split until every continuation byte spans a full range
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    todo += [(lo, lo | m), ((lo | m) + 1, hi)]
                    break
                if hi & m != m:
                    todo += [(lo, (hi & ~m) - 1), (hi & ~m, hi)]
                    break
        else:
            out.append(list(zip(chr(lo).encode(), chr(hi).encode(), strict=True)))
    return out


class _Nfa:
    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []  # (byte lo, byte hi, target)

    def state(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise UnsupportedPattern(f"the pattern needs more than {MAX_NFA_STATES:,} NFA states")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node: tuple) -> tuple[int, int]:
        """(start, end) states of the fragment matching `node`."""
        kind = node[0]
        if kind == "chars":
            start, end = self.state(), self.state()
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    cur = start
                    for k, (a, b) in enumerate(seq):
                        nxt = end if k == len(seq) - 1 else self.state()
                        self.edges[cur].append((a, b, nxt))
                        cur = nxt
            return start, end
        if kind == "cat":
            start = cur = self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[cur].append(s)
                cur = e
            return start, cur
        if kind == "alt":
            start, end = self.state(), self.state()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, child, lo, hi = node
        start = cur = self.state()
        for _ in range(lo):
            s, e = self.build(child)
            self.eps[cur].append(s)
            cur = e
        if hi is None:  # a loop after the required copies
            loop = self.state()
            s, e = self.build(child)
            self.eps[cur] += [loop]
            self.eps[loop].append(s)
            self.eps[e].append(loop)
            return start, loop
        end = self.state()
        for _ in range(hi - lo):  # optional copies, each may end the repetition
            self.eps[cur].append(end)
            s, e = self.build(child)
            self.eps[cur].append(s)
            cur = e
        self.eps[cur].append(end)
        return start, end

    def closure(self, states) -> frozenset[int]:
        seen, todo = set(states), list(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)


def compile_tree(tree: tuple) -> ByteDfa:
    """The minimal-enough DFA of a `regex_syntax` tree (subset construction, dead states cut).
    Raises UnsupportedPattern past the size limits or for a pattern that matches nothing."""
    nfa = _Nfa()
    start, final = nfa.build(tree)
    # Byte classes: bytes no edge tells apart share a column during the construction.
    cuts = sorted({0, 256} | {a for es in nfa.edges for a, _, _ in es}
                  | {b + 1 for es in nfa.edges for _, b, _ in es})
    class_of = np.zeros(256, np.int32)
    for c, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        class_of[a:b] = c
    num_classes = len(cuts) - 1
    moves = [[(int(class_of[a]), int(class_of[b]), t) for a, b, t in es] for es in nfa.edges]

    first = nfa.closure([start])
    ids = {first: 0}
    sets, rows = [first], []
    for current in sets:  # grows while it is walked
        targets: list[set[int]] = [set() for _ in range(num_classes)]
        for s in current:
            for c0, c1, t in moves[s]:
                for c in range(c0, c1 + 1):
                    targets[c].add(t)
        row = []
        for c in range(num_classes):
            if not targets[c]:
                row.append(-1)
                continue
            nxt = nfa.closure(targets[c])
            if nxt not in ids:
                if len(sets) >= MAX_DFA_STATES:
                    raise UnsupportedPattern(
                        f"the pattern needs more than {MAX_DFA_STATES:,} automaton states")
                ids[nxt] = len(sets)
                sets.append(nxt)
            row.append(ids[nxt])
        rows.append(row)
    by_class = np.array(rows, np.int32).reshape(len(sets), num_classes)
    accepting = np.array([final in s for s in sets], bool)
    return _prune(by_class[:, class_of], accepting)


def _prune(transitions: np.ndarray, accepting: np.ndarray) -> ByteDfa:
    """Cut the states from which nothing can be accepted; renumber the rest (start stays 0)."""
    n = len(accepting)
    sources, _ = np.nonzero(transitions >= 0)
    pairs = np.unique(sources.astype(np.int64) * n + transitions[transitions >= 0])
    by_target = [[] for _ in range(n)]  # who leads to each state
    for source, target in zip((pairs // n).tolist(), (pairs % n).tolist(), strict=True):
        by_target[target].append(source)
    live = accepting.copy()
    todo = np.flatnonzero(accepting).tolist()
    while todo:  # walk back from the accepting states
        for source in by_target[todo.pop()]:
            if not live[source]:
                live[source] = True
                todo.append(source)
    if not live[0]:
        raise UnsupportedPattern("the pattern matches no text")
    new_id = np.full(n + 1, -1, np.int32)  # index n: "no transition"
    new_id[np.flatnonzero(live)] = np.arange(int(live.sum()), dtype=np.int32)
    kept = transitions[live]
    return ByteDfa(transitions=new_id[np.where(kept >= 0, kept, n)],
                   accepting=accepting[live])


__all__ = ["ByteDfa", "compile_tree", "utf8_sequences"]
