"""The step's two query blocks (`dendrite_jax.engine.step_plan`), shared by every backend.

A step's tokens are `num_decode` rows of one query, then rows padded to `max_q_len` queries.
Each backend supplies attention over rows `[R, Q, Hq, hd]`; this module slices the blocks out,
runs it on each, and lays the results back out as the step's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# attend(q [R, Q, Hq, hd], q_lens [R], seq_lens [R], page_tables [R, P]) -> [R, Q, Hq, hd]
AttendRows = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def prefill_rows(x: jax.Array, num_decode: int, max_q_len: int) -> jax.Array:
    """The prefill block of per-token x [T, ...] as rows [R, max_q_len, ...]."""
    rest = x[num_decode:]
    return rest.reshape(-1, max_q_len, *x.shape[1:])


def join_blocks(decode_out: jax.Array | None, prefill_out: jax.Array | None) -> jax.Array:
    """Per-row outputs of the two blocks ([R, ...] and [R, Q, ...]) back as tokens [T, ...]."""
    parts = []
    if decode_out is not None:
        parts.append(decode_out)
    if prefill_out is not None:
        parts.append(prefill_out.reshape(-1, *prefill_out.shape[2:]))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def attend_by_block(q: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                    page_tables: jax.Array, *, num_decode: int, max_q_len: int,
                    attend_prefill: AttendRows,
                    attend_decode: AttendRows | None = None) -> jax.Array:
    """Step queries [T, Hq, hd] -> outputs [T, Hq, hd]: `attend_decode` (default:
    `attend_prefill`) on the decode rows (Q = 1), `attend_prefill` on the prefill rows."""
    num_prefill = page_tables.shape[0] - num_decode
    attend_decode = attend_decode or attend_prefill
    decode_out = prefill_out = None
    if num_decode:
        decode_out = attend_decode(q[:num_decode, None], q_lens[:num_decode],
                                   seq_lens[:num_decode], page_tables[:num_decode])[:, 0]
    if num_prefill:
        prefill_out = attend_prefill(prefill_rows(q, num_decode, max_q_len),
                                     q_lens[num_decode:], seq_lens[num_decode:],
                                     page_tables[num_decode:])
    out = join_blocks(decode_out, prefill_out)
    assert out.shape[0] == q.shape[0], (out.shape, q.shape)
    return out
