"""Pure-JAX ragged paged attention: the correctness oracle and the CPU path.

A step's flat tokens become decode rows and prefill blocks (`ragged`). Each row attends
causally to its context, read from its pages a chunk at a time through an online softmax, for
as many chunks as the step's longest context needs: page tables are always full width, and a
row costs what its context holds, not what the table could hold.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged

CHUNK_TOKENS = 256  # keys per loop step

# read(tables [R, C]) -> (k, v) [R, C * page_size, Hkv, hd] in position order
ReadPages = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def attend_pages(q: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                 page_tables: jax.Array, read: ReadPages, *, page_size: int, sm_scale: float,
                 sliding_window: int | None, soft_cap: float | None,
                 tail_window: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """q [R, Q, Hq, hd] of R rows, each row's queries the last q_len positions of its context
    of seq_len keys, read through `read` -> [R, Q, Hq, hd] float32; query slots past q_len
    and rows without context give zeros. With `tail_window` (`tail`), position 0 and the
    last `tail_window` positions up to each query are left out, and the softmax's log-sum-exp
    [R, Q, Hq] (-inf where no key is left) comes back beside the output."""
    rows, max_q_len, num_heads, head_dim = q.shape
    chunk = max(1, min(CHUNK_TOKENS // page_size, page_tables.shape[1]))
    pad = -page_tables.shape[1] % chunk
    tables = jnp.pad(page_tables, ((0, 0), (0, pad))) if pad else page_tables
    q_pos = (seq_lens - q_lens)[:, None] + jnp.arange(max_q_len)  # [R, Q]
    num_chunks = -(-jnp.max(seq_lens, initial=0) // (chunk * page_size))

    def body(c, carry):
        m, denom, acc = carry
        k, v = read(jax.lax.dynamic_slice_in_dim(tables, c * chunk, chunk, axis=1))
        num_kv_heads = k.shape[2]
        group = num_heads // num_kv_heads
        qg = q.reshape(rows, max_q_len, num_kv_heads, group, head_dim)
        # HIGHEST: float32 inputs stay float32 on GPUs too (XLA would use TF32 by default);
        # this function is the oracle the kernels are checked against.
        s = jnp.einsum("rqhgd,rkhd->rqhgk", qg, k, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32) * sm_scale
        s = s.reshape(rows, max_q_len, num_heads, -1)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = c * chunk * page_size + jnp.arange(k.shape[1])
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
            k_pos[None, None, :] < seq_lens[:, None, None])
        if sliding_window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        if tail_window is not None:
            mask &= (k_pos[None, None, :] >= 1) & (
                k_pos[None, None, :] <= q_pos[:, :, None] - tail_window)
        s = jnp.where(mask[:, :, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - safe[..., None])
        scale = jnp.exp(jnp.where(jnp.isfinite(m), m, safe) - safe)
        pv = jnp.einsum("rqhgk,rkhd->rqhgd",
                        p.reshape(rows, max_q_len, num_kv_heads, group, -1).astype(v.dtype), v,
                        precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
        acc = acc * scale[..., None] + pv.reshape(rows, max_q_len, num_heads, head_dim)
        return m_new, denom * scale + p.sum(-1), acc

    init = (jnp.full((rows, max_q_len, num_heads), -jnp.inf, jnp.float32),
            jnp.zeros((rows, max_q_len, num_heads), jnp.float32),
            jnp.zeros((rows, max_q_len, num_heads, head_dim), jnp.float32))
    m, denom, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    valid = jnp.arange(max_q_len)[None, :] < q_lens[:, None]
    out = jnp.where(valid[:, :, None, None], out, 0.0)
    if tail_window is None:
        return out
    live = valid[:, :, None] & (denom > 0)
    return out, jnp.where(live, m + jnp.log(jnp.where(live, denom, 1.0)), -jnp.inf)


def page_reader(k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array) -> ReadPages:
    """Reads layer `layer`'s keys and values of a [L, N, page_size, Hkv, hd] cache."""
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    def read(tables: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows, pages = tables.shape
        k = k_pages[layer, tables]
        v = v_pages[layer, tables]
        if k.dtype.itemsize == 1:  # FP8 pages: computed in float32 (scales applied outside)
            k, v = k.astype(jnp.float32), v.astype(jnp.float32)
        return (k.reshape(rows, pages * k.shape[2], *k.shape[3:]),
                v.reshape(rows, pages * v.shape[2], *v.shape[3:]))
    return read


def ragged_paged_attention(
    q: jax.Array,  # [T, Hq, hd]
    k_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    v_pages: jax.Array,  # [L, N, page_size, Hkv, hd]
    layer: jax.Array,  # scalar int32
    rows: RaggedRows,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    tail_window: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention output [T, Hq, hd]; padding tokens get zeros. With `tail_window`, the
    tail's positions are left out and (output float32, log-sum-exp [T, Hq]) come back."""
    q = jnp.asarray(q)
    read = page_reader(k_pages, v_pages, layer)

    def attend(row_q, row_q_lens, row_seq_lens, row_tables):
        return attend_pages(row_q, row_q_lens, row_seq_lens, row_tables, read,
                            page_size=k_pages.shape[2], sm_scale=sm_scale,
                            sliding_window=sliding_window, soft_cap=soft_cap,
                            tail_window=tail_window)

    out = attend_ragged(q, rows, attend_prefill=attend)
    return out if tail_window is not None else out.astype(q.dtype)
