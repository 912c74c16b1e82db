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


def attend_by_block(q: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                    page_tables: jax.Array, *, num_decode: int, max_q_len: int,
                    attend_prefill: AttendRows,
                    attend_decode: AttendRows | None = None) -> jax.Array:
    """Step queries [T, Hq, hd] -> outputs [T, Hq, hd]: `attend_decode` (default:
    `attend_prefill`) on the decode rows (Q = 1), `attend_prefill` on the prefill rows."""
    num_tokens, num_heads, head_dim = q.shape
    num_prefill = page_tables.shape[0] - num_decode
    attend_decode = attend_decode or attend_prefill
    parts = []
    if num_decode:
        out = attend_decode(q[:num_decode, None], q_lens[:num_decode], seq_lens[:num_decode],
                            page_tables[:num_decode])
        parts.append(out.reshape(num_decode, num_heads, head_dim))
    if num_prefill:
        out = attend_prefill(q[num_decode:].reshape(num_prefill, max_q_len, num_heads, head_dim),
                             q_lens[num_decode:], seq_lens[num_decode:], page_tables[num_decode:])
        parts.append(out.reshape(num_prefill * max_q_len, num_heads, head_dim))
    out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    assert out.shape[0] == num_tokens, (out.shape, num_tokens)
    return out
