"""Pure-JAX ragged paged attention: the correctness oracle and the CPU path.

One call serves a ragged batch: each sequence contributes `q_len` query tokens (a prefill
chunk, or 1 for decode) that attend causally to its whole context, read from its pages.
Queries are gathered into a padded [S, max_q_len] block, so cost is S x max_q_len x context;
the host keeps max_q_len small by bucketing and chunking.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, hd]
    k_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    v_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    layer: jax.Array,  # scalar int32
    cu_q_lens: jax.Array,  # [S + 1]
    seq_lens: jax.Array,  # [S]
    page_tables: jax.Array,  # [S, P]
    *,
    max_q_len: int,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention output [T, Hq, hd] for each query token; padding tokens get zeros."""
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_tables.shape
    group = num_heads // num_kv_heads
    context = pages_per_seq * page_size

    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    q_index = jnp.arange(max_q_len)
    token_of = jnp.clip(cu_q_lens[:-1, None] + q_index, 0, num_tokens - 1)  # [S, Q]
    q_block = q[token_of].reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)

    k = k_pages[layer, page_tables].reshape(num_seqs, context, num_kv_heads, head_dim)
    v = v_pages[layer, page_tables].reshape(num_seqs, context, num_kv_heads, head_dim)

    # HIGHEST: float32 inputs stay float32 on GPUs too (XLA would use TF32 by default); this
    # function is the oracle the kernels are checked against.
    scores = jnp.einsum("sqhgd,skhd->shgqk", q_block, k, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    q_pos = (seq_lens - q_lens)[:, None] + q_index  # [S, Q]
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
    out = jnp.einsum("shgqk,skhd->sqhgd", probs.astype(v.dtype), v,
                     precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    out = out.reshape(num_seqs, max_q_len, num_heads, head_dim)

    t = jnp.arange(num_tokens)
    token_seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0, num_seqs - 1)
    token_q = jnp.clip(t - cu_q_lens[token_seq], 0, max_q_len - 1)
    valid = t < cu_q_lens[-1]
    return jnp.where(valid[:, None, None], out[token_seq, token_q], 0).astype(q.dtype)
