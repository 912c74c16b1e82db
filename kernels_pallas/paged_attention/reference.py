"""Pure-JAX ragged paged attention: the correctness oracle and the CPU path.

A step's queries come in two blocks (see `dendrite_jax.engine.step_plan`): `num_decode` rows of
one token, then rows of up to `max_q_len` tokens (prefill chunks). Each row attends causally
to its whole context, read from its pages. Each block is computed as a dense padded batch, so
decode rows never pay for the prefill rows' query length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention.blocks import attend_by_block


def attend_context(q: jax.Array, k: jax.Array, v: jax.Array, q_lens: jax.Array,
                   seq_lens: jax.Array, *, sm_scale: float, sliding_window: int | None,
                   soft_cap: float | None) -> jax.Array:
    """q [R, Q, Hq, hd] for R rows attending to their contexts k, v [R, C, Hkv, hd] (position
    order, valid up to seq_len) -> [R, Q, Hq, hd]; query slots past q_len give zeros."""
    rows, max_q_len, num_heads, head_dim = q.shape
    _, context, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    q = q.reshape(rows, max_q_len, num_kv_heads, group, head_dim)
    # HIGHEST: float32 inputs stay float32 on GPUs too (XLA would use TF32 by default); this
    # function is the oracle the kernels are checked against.
    scores = jnp.einsum("rqhgd,rkhd->rhgqk", q, k, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    q_index = jnp.arange(max_q_len)
    q_pos = (seq_lens - q_lens)[:, None] + q_index  # [R, Q]
    k_pos = jnp.arange(context)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
        k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("rhgqk,rkhd->rqhgd", probs.astype(v.dtype), v,
                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    out = out.reshape(rows, max_q_len, num_heads, head_dim)
    return jnp.where((q_index < q_lens[:, None])[:, :, None, None], out, 0.0)


def _attend_block(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
                  q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array,
                  **kwargs) -> jax.Array:
    """`attend_context` over the rows' pages of layer `layer`."""
    rows, (_, _, page_size, num_kv_heads, head_dim) = q.shape[0], k_pages.shape
    context = page_tables.shape[1] * page_size
    k = k_pages[layer, page_tables].reshape(rows, context, num_kv_heads, head_dim)
    v = v_pages[layer, page_tables].reshape(rows, context, num_kv_heads, head_dim)
    return attend_context(q, k, v, q_lens, seq_lens, **kwargs)


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, hd], T = num_decode + num_prefill * max_q_len
    k_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    v_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    layer: jax.Array,  # scalar int32
    q_lens: jax.Array,  # [S]
    seq_lens: jax.Array,  # [S]
    page_tables: jax.Array,  # [S, P]
    *,
    num_decode: int,
    max_q_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention output [T, Hq, hd]; padding query slots get zeros."""
    def attend(rows, row_q_lens, row_seq_lens, row_tables):
        return _attend_block(rows, k_pages, v_pages, layer, row_q_lens, row_seq_lens,
                             row_tables, sm_scale=sm_scale, sliding_window=sliding_window,
                             soft_cap=soft_cap)

    out = attend_by_block(q, q_lens, seq_lens, page_tables, num_decode=num_decode,
                          max_q_len=max_q_len, attend_prefill=attend)
    return out.astype(q.dtype)
