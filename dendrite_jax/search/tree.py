"""TreeState: many token sequences stored as paths in one shared tree.

A sequence is a handle (a node id): its tokens are the path from the root to that node.
`fork` and `append` are O(1) (a fork is another reference to the same node; an append adds a
child), `merge` keeps one of two sequences and releases the other, and `release` frees the nodes
no sequence reaches any more. Beam search keeps its beams and finished hypotheses here, so a
step that forks w beams from their parents costs O(w), not O(w x length).

Invariant: a node's reference count is the number of handles held on it plus its live
children; a node with count 0 is on the free list and no handle points at it.
"""

from __future__ import annotations


class TreeState:
    def __init__(self) -> None:
        self._token: list[int] = []
        self._parent: list[int] = []
        self._depth: list[int] = []
        self._refs: list[int] = []
        self._free: list[int] = []

    def _node(self, token: int, parent: int) -> int:
        depth = 1 if parent < 0 else self._depth[parent] + 1
        if self._free:
            node = self._free.pop()
            self._token[node], self._parent[node] = token, parent
            self._depth[node], self._refs[node] = depth, 1
        else:
            node = len(self._token)
            self._token.append(token)
            self._parent.append(parent)
            self._depth.append(depth)
            self._refs.append(1)
        return node

    def sequence(self, tokens: list[int]) -> int:
        """A new sequence holding `tokens` (at least one)."""
        if not tokens:
            raise ValueError("a sequence needs at least one token")
        node = self._node(tokens[0], -1)
        for t in tokens[1:]:
            node = self.extend(node, t)
        return node

    def append(self, seq: int, token: int) -> int:
        """`seq` followed by `token`, as a new handle; `seq` stays valid (release it if unused)."""
        self._check(seq)
        self._refs[seq] += 1
        return self._node(token, seq)

    def extend(self, seq: int, token: int) -> int:
        """Append and give up the old handle (the usual step of a growing sequence)."""
        new = self.append(seq, token)
        self.release(seq)
        return new

    def fork(self, seq: int) -> int:
        """Another handle on the same sequence."""
        self._check(seq)
        self._refs[seq] += 1
        return seq

    def merge(self, keep: int, drop: int) -> int:
        """Two sequences become one: `drop` is released, `keep` returned."""
        self.release(drop)
        return keep

    def release(self, seq: int) -> None:
        """Give up a handle; nodes no handle or child reaches go back to the free list."""
        self._check(seq)
        node = seq
        while node >= 0:
            self._refs[node] -= 1
            if self._refs[node]:
                return
            self._free.append(node)
            node = self._parent[node]

    def tokens(self, seq: int) -> list[int]:
        self._check(seq)
        out, node = [], seq
        while node >= 0:
            out.append(self._token[node])
            node = self._parent[node]
        return out[::-1]

    def length(self, seq: int) -> int:
        self._check(seq)
        return self._depth[seq]

    def last(self, seq: int) -> int:
        self._check(seq)
        return self._token[seq]

    @property
    def num_nodes(self) -> int:
        """Nodes in use (shared prefixes counted once)."""
        return len(self._token) - len(self._free)

    def _check(self, seq: int) -> None:
        if not (0 <= seq < len(self._refs)) or self._refs[seq] <= 0:
            raise ValueError(f"sequence handle {seq} is not live")
