"""A step's flat token axis as the rows every attention backend computes.

A step is T tokens on one axis plus per-sequence arrays of R rows: `q_lens` [R] (query tokens),
`seq_lens` [R] (context length after the step, new tokens included) and `page_tables` [R, P].
Row r owns the tokens `cu_q_lens[r] + [0, q_lens[r])`, where `cu_q_lens` is the running sum
of `q_lens`; rows of no tokens are padding, and tokens past the last row are padding too.

Backends attend over two kinds of rows, derived here once per step (`RaggedRows`):

- **decode rows**: the R sequences themselves, each with its one query token where
  `q_len == 1` (a decode step, or a prompt's last single-token chunk), else empty;
- **prefill blocks**: each sequence of more than one query token split into blocks of
  `block_q` consecutive queries, a block being a row of the same form (its own q_len and
  seq_len, its sequence's page table).

A decode-only step (`decode_only`: every row has at most one token, and token r is row r's)
has no blocks at all. Queries go to the rows by a gather and outputs come back by a scatter,
so the kernels keep their dense row layouts while nothing is padded per sequence except each
prefill sequence's last block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

# attend(q [R, Q, Hq, hd], q_lens [R], seq_lens [R], page_tables [R, P]) -> [R, Q, Hq, hd]
AttendRows = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

MAX_BLOCK_Q = 64  # queries per prefill block


def block_q_for(num_tokens: int) -> int:
    """Queries per prefill block for a step of `num_tokens` tokens."""
    return min(MAX_BLOCK_Q, num_tokens)


def num_blocks_for(num_tokens: int, num_rows: int) -> int:
    """Enough prefill blocks for any step of `num_tokens` tokens over `num_rows` rows: the full
    blocks, plus one partial block per prefill row (a prefill row has at least two tokens)."""
    block_q = block_q_for(num_tokens)
    return -(-num_tokens // block_q) + min(num_rows, num_tokens // 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RaggedRows:
    """Where a step's queries sit, as decode rows and prefill blocks (see the module)."""

    q_lens: jax.Array  # [R]
    seq_lens: jax.Array  # [R]
    page_tables: jax.Array  # [R, P]
    decode_tokens: jax.Array  # [R] each decode row's token; T + r (out of range) elsewhere
    decode_seq_lens: jax.Array  # [R] seq_len of decode rows, 0 elsewhere
    block_tokens: jax.Array  # [NB, block_q] each block's tokens; >= T (out of range) past it
    block_q_lens: jax.Array  # [NB]
    block_seq_lens: jax.Array  # [NB] context length after the block's last query
    block_tables: jax.Array  # [NB, P] the page table of the block's sequence
    num_tokens: int = dataclasses.field(metadata=dict(static=True))
    decode_only: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def num_rows(self) -> int:
        return self.q_lens.shape[0]

    @property
    def decode_q_lens(self) -> jax.Array:
        return (self.decode_seq_lens > 0).astype(jnp.int32)


def ragged_rows(q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
                num_tokens: int, decode_only: bool = False) -> RaggedRows:
    """The decode rows and prefill blocks of a step of `num_tokens` tokens (traceable; the
    engine builds it once per step). With `decode_only`, every q_len is 0 or 1 and row r owns
    token r (num_tokens == R)."""
    q_lens = jnp.asarray(q_lens, jnp.int32)
    seq_lens = jnp.asarray(seq_lens, jnp.int32)
    page_tables = jnp.asarray(page_tables, jnp.int32)
    rows = q_lens.shape[0]
    if decode_only:
        if num_tokens != rows:
            raise ValueError(f"a decode-only step has one token per row: {num_tokens} tokens "
                             f"for {rows} rows")
        empty = jnp.zeros((0,), jnp.int32)
        return RaggedRows(q_lens, seq_lens, page_tables,
                          decode_tokens=jnp.arange(rows, dtype=jnp.int32),
                          decode_seq_lens=jnp.where(q_lens > 0, seq_lens, 0),
                          block_tokens=jnp.zeros((0, 1), jnp.int32), block_q_lens=empty,
                          block_seq_lens=empty,
                          block_tables=jnp.zeros((0, page_tables.shape[1]), jnp.int32),
                          num_tokens=num_tokens, decode_only=True)
    starts = jnp.cumsum(q_lens) - q_lens  # cu_q_lens[:-1]
    is_decode = q_lens == 1
    decode_tokens = jnp.where(is_decode, starts, num_tokens + jnp.arange(rows))
    block_q = block_q_for(num_tokens)
    num_blocks = num_blocks_for(num_tokens, rows)
    blocks_per_row = jnp.where(q_lens > 1, -(-q_lens // block_q), 0)
    block_ends = jnp.cumsum(blocks_per_row)
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(block_ends, b, side="right"), rows - 1)
    live = b < block_ends[-1]
    j = b - (block_ends[row] - blocks_per_row[row])  # the block's index within its row
    block_q_lens = jnp.where(live, jnp.clip(q_lens[row] - j * block_q, 0, block_q), 0)
    first_pos = seq_lens[row] - q_lens[row] + j * block_q
    block_seq_lens = jnp.where(live, first_pos + block_q_lens, 0)
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    outside = num_tokens + rows + b[:, None] * block_q + offsets  # distinct, out of range
    block_tokens = jnp.where(offsets < block_q_lens[:, None],
                             (starts[row] + j * block_q)[:, None] + offsets, outside)
    return RaggedRows(q_lens, seq_lens, page_tables, decode_tokens=decode_tokens,
                      decode_seq_lens=jnp.where(is_decode, seq_lens, 0),
                      block_tokens=block_tokens, block_q_lens=block_q_lens,
                      block_seq_lens=block_seq_lens, block_tables=page_tables[row],
                      num_tokens=num_tokens, decode_only=False)


def gather_decode(x: jax.Array, rows: RaggedRows) -> jax.Array:
    """Per-token x [T, ...] at the decode rows' tokens: [R, ...] (anything for other rows)."""
    return x if rows.decode_only else jnp.take(x, rows.decode_tokens, axis=0, mode="clip")


def gather_blocks(x: jax.Array, rows: RaggedRows) -> jax.Array:
    """Per-token x [T, ...] at the prefill blocks' tokens: [NB, block_q, ...]."""
    return jnp.take(x, rows.block_tokens, axis=0, mode="clip")


def scatter_rows(decode_out: jax.Array, block_out: jax.Array | None,
                 rows: RaggedRows) -> jax.Array:
    """Decode rows' outputs [R, ...] and blocks' outputs [NB, block_q, ...] back on the token
    axis [T, ...]; padding tokens get zeros."""
    if rows.decode_only:
        return decode_out
    out = jnp.zeros((rows.num_tokens, *decode_out.shape[1:]), decode_out.dtype)
    out = out.at[rows.decode_tokens].set(decode_out, mode="drop", unique_indices=True)
    if block_out is not None:
        flat = block_out.reshape(-1, *block_out.shape[2:]).astype(out.dtype)
        out = out.at[rows.block_tokens.reshape(-1)].set(flat, mode="drop", unique_indices=True)
    return out


def attend_ragged(q: jax.Array, rows: RaggedRows, *, attend_prefill: AttendRows,
                  attend_decode: AttendRows | None = None) -> jax.Array:
    """Step queries [T, Hq, hd] -> outputs [T, Hq, hd]: `attend_decode` (default:
    `attend_prefill`) on the decode rows (Q = 1), `attend_prefill` on the prefill blocks. An
    attend function may return a tuple of per-query arrays ([R, Q, ...] each): each comes back
    on the token axis."""
    attend_decode = attend_decode or attend_prefill
    decode_out = attend_decode(gather_decode(q, rows)[:, None], rows.decode_q_lens,
                               rows.decode_seq_lens, rows.page_tables)
    decode_out = jax.tree.map(lambda x: x[:, 0], decode_out)
    if rows.decode_only:
        return decode_out
    block_out = attend_prefill(gather_blocks(q, rows), rows.block_q_lens,
                               rows.block_seq_lens, rows.block_tables)
    return jax.tree.map(lambda d, b: scatter_rows(d, b, rows), decode_out, block_out)


__all__ = ["MAX_BLOCK_Q", "AttendRows", "RaggedRows", "attend_ragged", "block_q_for",
           "gather_blocks", "gather_decode", "num_blocks_for", "ragged_rows", "scatter_rows"]
