"""Properties of a step's flat token axis as decode rows and prefill blocks (`ragged`), on
random steps: every real token is computed exactly once, blocks are runs of one sequence's
consecutive tokens with the right context length, and the static block count always suffices."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.paged_attention.ragged import (
    attend_ragged,
    block_q_for,
    num_blocks_for,
    ragged_rows,
)

PAGES_PER_SEQ = 3
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def mixed_steps(draw):
    """(q_lens, seq_lens, page_tables, num_tokens): rows of 0..40 query tokens (sometimes up
    to 150, so that a row spans several prefill blocks), padding rows of none at the end,
    contexts at least as long as the queries, padding tokens at the end."""
    longest = draw(st.sampled_from([40, 40, 150]))
    q_lens = draw(st.lists(st.integers(0, longest), min_size=1, max_size=6))
    q_lens += [0] * draw(st.integers(0, 3))
    seq_lens = [q + draw(st.integers(0, 300)) for q in q_lens]
    tables = draw(st.lists(st.lists(st.integers(0, 999), min_size=PAGES_PER_SEQ,
                                    max_size=PAGES_PER_SEQ),
                           min_size=len(q_lens), max_size=len(q_lens)))
    num_tokens = max(1, sum(q_lens) + draw(st.integers(0, 70)))
    return q_lens, seq_lens, tables, num_tokens


def token_rows(q_lens, num_tokens) -> np.ndarray:
    """Each token's row in the flat layout (rows in order, each its q_len tokens); -1 past them."""
    rows = np.repeat(np.arange(len(q_lens)), q_lens)
    return np.concatenate([rows, np.full(num_tokens - len(rows), -1)])


def check_round_trip(rows, q_lens, seq_lens, num_tokens, decode_only):
    """Through `attend_ragged` with an attention that returns each query's own value and its
    position: every real token gets back its own value and position, padding tokens zeros."""
    def attend(q, row_q_lens, row_seq_lens, _):
        index = jnp.arange(q.shape[1])
        position = (row_seq_lens - row_q_lens)[:, None] + index
        out = jnp.stack([q[..., 0, 0], position.astype(q.dtype)], axis=-1)[:, :, None]
        return jnp.where((index < row_q_lens[:, None])[:, :, None, None], out, 0.0)

    values = jnp.arange(1, num_tokens + 1, dtype=jnp.float32)[:, None, None]
    out = np.asarray(attend_ragged(values, rows, attend_prefill=attend))[:, 0]
    q = np.asarray(q_lens)
    if decode_only:
        real = q > 0
        positions = np.asarray(seq_lens) - 1
    else:
        owner = token_rows(q_lens, num_tokens)
        real = owner >= 0
        starts = np.cumsum(q) - q
        t = np.arange(num_tokens)
        positions = np.where(real, (np.asarray(seq_lens) - q)[owner] + t - starts[owner], 0)
    np.testing.assert_array_equal(out[real, 0], np.arange(1, num_tokens + 1)[real])
    np.testing.assert_array_equal(out[real, 1], positions[real])
    assert np.all(out[~real] == 0)


@SETTINGS
@given(mixed_steps())
def test_rows_cover_every_token_once(step):
    """Also through `attend_ragged` (`check_round_trip`)."""
    q_lens, seq_lens, tables, num_tokens = step
    q, s, tables = np.array(q_lens), np.array(seq_lens), np.array(tables)
    rows = ragged_rows(q, s, tables, num_tokens=num_tokens)
    starts = np.cumsum(q) - q
    owner = token_rows(q_lens, num_tokens)
    num_real = int(q.sum())
    seen = []

    decode_tokens = np.asarray(rows.decode_tokens)
    decode_seq_lens = np.asarray(rows.decode_seq_lens)
    for r in range(len(q)):
        if q[r] == 1:  # a decode row: its one token
            assert decode_tokens[r] == starts[r] and decode_seq_lens[r] == s[r]
            seen.append(int(decode_tokens[r]))
        else:
            assert decode_tokens[r] >= num_tokens and decode_seq_lens[r] == 0

    block_q = block_q_for(num_tokens)
    num_blocks = num_blocks_for(num_tokens, len(q))
    block_tokens = np.asarray(rows.block_tokens)
    assert block_tokens.shape == (num_blocks, block_q)
    block_q_lens = np.asarray(rows.block_q_lens)
    block_seq_lens = np.asarray(rows.block_seq_lens)
    block_tables = np.asarray(rows.block_tables)
    for b in range(num_blocks):
        real = block_tokens[b] < num_tokens
        n = int(real.sum())
        assert block_q_lens[b] == n and real[:n].all()  # the block's tokens lead its slots
        if not n:
            assert block_seq_lens[b] == 0
            continue
        tokens = block_tokens[b, :n]
        np.testing.assert_array_equal(tokens, tokens[0] + np.arange(n))  # consecutive
        row = owner[tokens[0]]
        assert row >= 0 and q[row] > 1 and (owner[tokens] == row).all()  # one prefill row's
        last_position = s[row] - q[row] + (tokens[-1] - starts[row])
        assert block_seq_lens[b] == last_position + 1
        np.testing.assert_array_equal(block_tables[b], tables[row])
        seen.extend(int(t) for t in tokens)

    assert sorted(seen) == list(range(num_real))  # every real token exactly once
    live = int((block_q_lens > 0).sum())
    assert live == sum(-(-int(x) // block_q) for x in q if x > 1) <= num_blocks
    # Every index, real or not, is distinct: the scatter back promises unique indices.
    everything = np.concatenate([decode_tokens, block_tokens.reshape(-1)])
    assert len(np.unique(everything)) == everything.size
    check_round_trip(rows, q_lens, seq_lens, num_tokens, False)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 300)), min_size=1, max_size=8))
def test_decode_only_rows(rows_drawn):
    """A decode-only step: token r is row r's (rows of no token anywhere), no blocks."""
    q_lens = [q for q, _ in rows_drawn]
    seq_lens = [q + extra for q, extra in rows_drawn]
    tables = np.zeros((len(q_lens), PAGES_PER_SEQ), np.int32)
    rows = ragged_rows(np.array(q_lens), np.array(seq_lens), tables, num_tokens=len(q_lens),
                       decode_only=True)
    assert rows.decode_only and rows.block_tokens.shape[0] == 0
    np.testing.assert_array_equal(np.asarray(rows.decode_tokens), np.arange(len(q_lens)))
    np.testing.assert_array_equal(np.asarray(rows.decode_seq_lens),
                                  np.where(np.array(q_lens) > 0, seq_lens, 0))
    check_round_trip(rows, q_lens, seq_lens, len(q_lens), True)


def test_decode_only_needs_one_token_per_row():
    with pytest.raises(ValueError, match="one token per row"):
        ragged_rows(np.ones(4, np.int32), np.ones(4, np.int32), np.zeros((4, 2), np.int32),
                    num_tokens=8, decode_only=True)
