"""TreeState: random fork/append/extend/merge/release sequences against plain lists; nothing
leaks once every handle is released."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.search.tree import TreeState

ops = st.lists(st.tuples(st.sampled_from(["append", "extend", "fork", "merge", "release"]),
                         st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 50)),
               max_size=80)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=5), ops)
def test_matches_lists_and_frees_everything(start, operations):
    tree = TreeState()
    handles = {tree.sequence(start): None}
    expected = [(next(iter(handles)), list(start))]  # (handle, tokens), one entry per handle
    for op, a, b, token in operations:
        if not expected:
            break
        i = a % len(expected)
        h, toks = expected[i]
        if op == "append":
            expected.append((tree.append(h, token), toks + [token]))
        elif op == "extend":
            expected[i] = (tree.extend(h, token), toks + [token])
        elif op == "fork":
            expected.append((tree.fork(h), list(toks)))
        elif op == "merge" and len(expected) > 1:
            j = b % len(expected)
            if j != i:
                keep = tree.merge(h, expected[j][0])
                assert keep == h
                expected.pop(j)
        elif op == "release":
            tree.release(h)
            expected.pop(i)
        for handle, toks in expected:
            assert tree.tokens(handle) == toks
            assert tree.length(handle) == len(toks) and tree.last(handle) == toks[-1]
        # Shared prefixes are stored once: never more nodes than tokens over all handles.
        assert tree.num_nodes <= sum(len(t) for _, t in expected)
    for handle, _ in expected:
        tree.release(handle)
    assert tree.num_nodes == 0


def test_fork_and_append_share_the_prefix():
    tree = TreeState()
    root = tree.sequence([1, 2, 3])
    children = [tree.append(root, t) for t in (4, 5, 6)]
    tree.release(root)
    assert tree.num_nodes == 6  # three shared + one per child
    assert [tree.tokens(c) for c in children] == [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 6]]
    tree.release(children[0])
    with pytest.raises(ValueError, match="not live"):
        tree.tokens(children[0])
