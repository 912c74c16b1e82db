"""RadixTree: a compressed trie from page-aligned token sequences to page ids.

Keys are whole pages of token ids (tuples of `page_size` ids); each edge holds a run of pages
and their values (page ids), and edges split where two sequences diverge. Every node records
when it was last used, for LRU eviction. `remove_by_value` drops a page and everything after
it in its branch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

PageKey = tuple[int, ...]


class _Node:
    __slots__ = ("children", "keys", "last_access", "parent", "values")

    def __init__(self, parent: _Node | None, keys: list[PageKey], values: list[int],
                 now: float) -> None:
        self.parent = parent
        self.keys = keys
        self.values = values
        self.children: dict[PageKey, _Node] = {}
        self.last_access = now

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclasses.dataclass(frozen=True)
class RadixStats:
    nodes: int  # edges (the root excluded)
    pages: int
    tokens: int
    utilization: float  # pages held / capacity_pages (0 when no capacity was given)


class RadixTree:
    def __init__(self, page_size: int, capacity_pages: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.clock = clock
        self.root = _Node(None, [], [], clock())
        self._where: dict[int, _Node] = {}  # value -> the node holding it

    # ------------------------------------------------------------------------------- keys

    def page_keys(self, tokens: Sequence[int]) -> list[PageKey]:
        """The full pages of `tokens` as keys; a partial last page is ignored."""
        ps = self.page_size
        return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) - ps + 1, ps)]

    # ------------------------------------------------------------------------------- queries

    def find_prefix(self, tokens: Sequence[int], touch: bool = True) -> list[int]:
        """Values of the longest run of leading full pages of `tokens` present in the tree."""
        keys = self.page_keys(tokens)
        node, i, found = self.root, 0, []
        now = self.clock()
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                break
            m = _common_prefix(child.keys, keys, i)
            found.extend(child.values[:m])
            if touch:
                child.last_access = now
            if m < len(child.keys):
                break
            node, i = child, i + m
        return found

    def find_exact(self, tokens: Sequence[int]) -> list[int] | None:
        """Values for `tokens` if every one of its full pages is present, else None."""
        keys = self.page_keys(tokens)
        found = self.find_prefix(tokens, touch=False)
        return found if len(found) == len(keys) else None

    def __contains__(self, value: int) -> bool:
        return value in self._where

    def values(self) -> Iterable[int]:
        """Every value in the tree."""
        return self._where.keys()

    # ------------------------------------------------------------------------------- changes

    def insert(self, tokens: Sequence[int], values: Sequence[int]) -> list[int]:
        """Add the full pages of `tokens` with `values` (one per page). Pages already present
        keep their existing value. Returns the values in the tree for these pages afterwards."""
        keys = self.page_keys(tokens)
        if len(values) < len(keys):
            raise ValueError(f"{len(keys)} full pages but only {len(values)} values")
        values = list(values[:len(keys)])
        node, i, result = self.root, 0, []
        now = self.clock()
        while i < len(keys):
            child = node.children.get(keys[i])
            if child is None:
                leaf = _Node(node, keys[i:], values[i:], now)
                node.children[keys[i]] = leaf
                for v in leaf.values:
                    if v in self._where:
                        raise ValueError(f"value {v} is already in the tree")
                    self._where[v] = leaf
                result.extend(leaf.values)
                break
            m = _common_prefix(child.keys, keys, i)
            if m < len(child.keys):
                self._split(child, m)
            child.last_access = now
            result.extend(child.values)
            node, i = child, i + m
        return result

    def _split(self, node: _Node, at: int) -> None:
        """Cut node's edge after `at` pages: node keeps the head, a new child the tail."""
        tail = _Node(node, node.keys[at:], node.values[at:], node.last_access)
        tail.children = node.children
        for grandchild in tail.children.values():
            grandchild.parent = tail
        for v in tail.values:
            self._where[v] = tail
        node.keys, node.values = node.keys[:at], node.values[:at]
        node.children = {tail.keys[0]: tail}

    def remove_by_value(self, value: int) -> list[int]:
        """Remove the page holding `value` and everything after it. Returns removed values."""
        node = self._where.get(value)
        if node is None:
            raise KeyError(f"value {value} is not in the tree")
        at = node.values.index(value)
        removed = node.values[at:]
        for child in list(node.children.values()):
            removed.extend(self._drop_subtree(child))
        node.children = {}
        for v in node.values[at:]:
            del self._where[v]
        node.keys, node.values = node.keys[:at], node.values[:at]
        if not node.keys:
            self._unlink(node)
        return removed

    def _drop_subtree(self, node: _Node) -> list[int]:
        removed = list(node.values)
        for v in node.values:
            del self._where[v]
        for child in node.children.values():
            removed.extend(self._drop_subtree(child))
        return removed

    def _unlink(self, node: _Node) -> None:
        parent = node.parent
        for key, child in list(parent.children.items()):
            if child is node:
                del parent.children[key]

    # ------------------------------------------------------------------------------- eviction

    def leaves(self) -> list[_Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root and node.is_leaf:
                out.append(node)
        return out

    def stats(self) -> RadixStats:
        nodes = pages = 0
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            nodes += 1
            pages += len(node.values)
            stack.extend(node.children.values())
        capacity = self.capacity_pages or 0
        return RadixStats(nodes=nodes, pages=pages, tokens=pages * self.page_size,
                          utilization=pages / capacity if capacity else 0.0)


def _common_prefix(edge: list[PageKey], keys: list[PageKey], start: int) -> int:
    m = 0
    while m < len(edge) and start + m < len(keys) and edge[m] == keys[start + m]:
        m += 1
    return m
