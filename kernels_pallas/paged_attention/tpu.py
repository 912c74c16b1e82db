"""Ragged paged attention for TPUs: a Pallas Mosaic TPU kernel.

One kernel serves both kinds of rows of a step (`ragged`): rows of Q query tokens (Q = 1 for
the decode rows, `block_q_for(T)` for the prefill blocks of a step of T tokens). Grid (row,
page): the page axis is the reduction, and each grid step's K/V block is one page of every KV
head, `[page_size, Hkv, hd]`, chosen by the page table through scalar prefetch, so Pallas'
pipeline streams a row's pages from HBM while the previous one is computed. Pages past a row's
length (or before its sliding window) map to the last (first) needed page: an unchanged block
index issues no copy, and their compute is skipped. Queries are laid out per KV head as
`[Hkv, Q * group, hd]`, so one matmul per KV head scores every query head of its group.

Tested on CPU in TPU interpret mode (`interpret=True` uses `pltpu.InterpretParams`, which also
poisons uninitialised memory with NaNs); no TPU has run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def needed_pages(p, seq_len, first_q, page_size: int, sliding_window: int | None):
    """The page to fetch at grid step p: p clamped to the pages the row reads."""
    last = jnp.maximum(pl.cdiv(seq_len, page_size) - 1, 0)
    first = 0
    if sliding_window is not None:
        first = jnp.minimum(jnp.maximum(first_q - sliding_window + 1, 0) // page_size, last)
    return jnp.clip(p, first, last)


def init_scratch(*refs) -> None:
    """Reset the online softmax's scratch: the running max, then the sums (zeros)."""
    m_scratch, *rest = refs
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    for ref in rest:
        ref[...] = jnp.zeros(ref.shape, jnp.float32)


def page_live(page_start, page_size: int, seq_len, first_q, sliding_window: int | None):
    """Whether a page holds any key the row's queries see."""
    live = page_start < seq_len
    if sliding_window is not None:
        live &= page_start + page_size > first_q - sliding_window + 1
    return live


def page_keep(rows: int, page_size: int, group: int, first_q, page_start, seq_len,
              sliding_window: int | None):
    """Mask [rows, page_size] of the keys each query row (query-major, `group` heads per
    query) attends to in this page: causal, within the context and the window."""
    q_pos = first_q + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group
    k_pos = page_start + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
    keep = (k_pos <= q_pos) & (k_pos < seq_len)
    if sliding_window is not None:
        keep &= k_pos > q_pos - sliding_window
    return keep


def softmax_update(s, keep, soft_cap: float | None, m_ref, l_ref):
    """Fold one page's scores s [rows, page_size] (soft-capped, then masked by `keep`) into a
    head's running max and sum (refs [rows, 1]); returns (p, correction) for its accumulator."""
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(keep, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next)
    l_ref[...] = l_ref[...] * correction + p.sum(axis=-1, keepdims=True)
    m_ref[...] = m_next
    return p, correction


def _kernel(layer_ref, q_lens_ref, seq_lens_ref, tables_ref, q_ref, k_ref, v_ref, o_ref,
            m_scratch, l_scratch, acc_scratch, *, sm_scale: float, soft_cap: float | None,
            sliding_window: int | None, group: int):
    del layer_ref, tables_ref  # used by the index maps
    row, page = pl.program_id(0), pl.program_id(1)
    page_size, num_kv_heads, _ = k_ref.shape
    rows = q_ref.shape[1]  # Q * group
    q_len, seq_len = q_lens_ref[row], seq_lens_ref[row]
    first_q = seq_len - q_len  # position of the row's first query
    page_start = page * page_size

    pl.when(page == 0)(lambda: init_scratch(m_scratch, l_scratch, acc_scratch))

    @pl.when(page_live(page_start, page_size, seq_len, first_q, sliding_window))
    def _attend():
        keep = page_keep(rows, page_size, group, first_q, page_start, seq_len, sliding_window)
        # FP8 pages are read in the query's dtype (their scales are applied outside).
        k, v = k_ref[...].astype(q_ref.dtype), v_ref[...].astype(q_ref.dtype)
        # float32 stays float32 (interpreted on a GPU, a default-precision dot is TF32).
        precision = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
        for h in range(num_kv_heads):
            s = lax.dot_general(q_ref[h], k[:, h, :], (((1,), (1,)), ((), ())),
                                precision=precision,
                                preferred_element_type=jnp.float32) * sm_scale
            p, correction = softmax_update(s, keep, soft_cap, m_scratch.at[h], l_scratch.at[h])
            acc_scratch[h] = acc_scratch[h] * correction + jnp.dot(
                p.astype(v.dtype), v[:, h, :], precision=precision,
                preferred_element_type=jnp.float32)

    @pl.when(page == pl.num_programs(1) - 1)
    def _finish():
        denom = l_scratch[...]
        out = acc_scratch[...] / jnp.where(denom > 0, denom, 1.0)
        query = lax.broadcasted_iota(jnp.int32, out.shape, 1) // group
        o_ref[...] = jnp.where(query < q_len, out, 0.0).astype(o_ref.dtype)


def attend_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
                q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
                sm_scale: float, sliding_window: int | None = None,
                soft_cap: float | None = None, interpret: bool = False) -> jax.Array:
    """Rows of up to Q query tokens, the last q_len of each row's context: q [R, Q, Hq, hd]
    -> [R, Q, Hq, hd], zeros past q_len."""
    num_rows, max_q_len, num_heads, head_dim = q.shape
    _, _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    pages_per_seq = page_tables.shape[1]
    # [R, Q, Hkv, G, hd] -> [R, Hkv, Q * G, hd]: a KV head's query heads, query-major.
    q_heads = q.reshape(num_rows, max_q_len, num_kv_heads, group, head_dim)
    q_heads = q_heads.transpose(0, 2, 1, 3, 4).reshape(num_rows, num_kv_heads, -1, head_dim)
    rows = max_q_len * group

    def page_map(r, p, layer_ref, q_lens_ref, seq_lens_ref, tables_ref):
        seq_len = seq_lens_ref[r]
        needed = needed_pages(p, seq_len, seq_len - q_lens_ref[r], page_size, sliding_window)
        return layer_ref[0], tables_ref[r * pages_per_seq + needed], 0, 0, 0

    page_spec = pl.BlockSpec((None, None, page_size, num_kv_heads, head_dim), page_map)
    row_spec = pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda r, p, *_: (r, 0, 0, 0))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, group=group)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_rows, pages_per_seq),
            in_specs=[row_spec, page_spec, page_spec],
            out_specs=row_spec,
            scratch_shapes=[pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_heads.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attention_tpu",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), q_lens.astype(jnp.int32),
      seq_lens.astype(jnp.int32), page_tables.reshape(-1).astype(jnp.int32), q_heads,
      k_pages, v_pages)
    out = out.reshape(num_rows, num_kv_heads, max_q_len, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(q.shape)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           layer: jax.Array, rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           interpret: bool = False) -> jax.Array:
    """The step's attention [T, Hq, hd] (same contract as the reference)."""
    def attend(row_q, row_q_lens, row_seq_lens, row_tables):
        return attend_rows(row_q, k_pages, v_pages, layer, row_q_lens, row_seq_lens, row_tables,
                           sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                           interpret=interpret)

    return attend_ragged(q, rows, attend_prefill=attend)
