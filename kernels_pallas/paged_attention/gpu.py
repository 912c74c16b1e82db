"""Ragged paged attention for NVIDIA GPUs: Pallas kernels lowered through Triton.

Two kernels follow the step's two kinds of rows (`ragged`):

- `decode`: one program per (decode row, KV head, context split). The row's query heads of one
  KV head form the matrix rows, read with masked loads as 16 rows for the tensor cores (no
  padded copy of the queries); it streams the row's pages in blocks of `pages_per_block`
  through an online softmax. One split stores the final output straight into its heads' rows;
  several write unnormalised partial results, which `combine_splits` merges. Splitting the
  context keeps every SM busy at small batch and long context.
- `prefill`: one program per (prefill block, query head, tile of `PrefillTuning.block_q` of the
  block's queries), a flash-attention loop over the pages up to the tile's causal limit.

Both read K/V straight from the paged cache `[L, N, page_size, Hkv, hd]` through the page table
(flattened to `[L * N, ...]`; the kernels add layer * N to the page ids), so nothing is gathered or
copied outside the kernel. The step's queries reach the rows by a gather and their outputs come
back by a scatter (`ragged.attend_ragged`); a decode-only step's tokens are its decode rows.

Why Triton, which JAX has deprecated, and not Mosaic GPU: this lowering's kernels run under
Pallas' public interpret mode (`interpret=True`), so the exact kernel bodies run in the CPU
tests and CI; Mosaic GPU's interpreter (TMA copies, barriers, wgmma) lives only in JAX's
private modules (`jax._src.pallas.mosaic_gpu.interpret`, not exported by 0.10.2), and a kernel
tested only on a GPU would be unchecked in CI. The interface is the dispatcher's, so a Mosaic
GPU kernel can replace either function without touching the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged
from kernels_pallas.paged_attention.write import write_pages

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
MIN_DOT_ROWS = 16  # the smallest M, N and K Triton's tensor-core dot accepts
SHARED_MEMORY_BUDGET = 160 * 1024  # bytes of K/V tiles in flight; Hopper has 227 KiB per SM
MAX_BLOCK_TOKENS = 128  # the decode kernel's largest key block (pages of 128: one page a step)


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """Defaults: the fastest in kernel time on a Hopper GPU: 64-token
    blocks, 2 warps, no software pipelining; faster than 128-token blocks with 8 warps at every
    shape timed, most at short contexts. The programs are latency-bound there; smaller tiles per
    program bring more programs per SM."""

    pages_per_block: int = 4  # pages per loop step (block_k = pages_per_block * page_size)
    num_splits: int | None = None  # context splits; None picks from batch and context
    num_warps: int = 2
    num_stages: int = 1  # software-pipelining depth, lowered where the tiles would not fit


@dataclasses.dataclass(frozen=True)
class PrefillTuning:
    """Defaults: a flash-attention tile, not tuned for speed."""

    block_q: int = 64
    block_k: int = 64  # key tokens per loop step (a multiple of the page size)
    num_warps: int = 4
    num_stages: int = 2


def fit_stages(requested: int, bytes_per_stage: int) -> int:
    """The deepest pipelining, up to `requested`, whose tiles fit the shared-memory budget."""
    return max(1, min(requested, SHARED_MEMORY_BUDGET // bytes_per_stage))


def dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) accumulated in float32; float32 inputs stay float32 (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return pltriton.dot(a, b, trans_b=trans_b, precision=precision)


def _scores(q: jax.Array, k: jax.Array, sm_scale: float, soft_cap: float | None) -> jax.Array:
    s = dot(q, k, trans_b=True) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def online_softmax_step(carry, s: jax.Array, v: jax.Array):
    """Fold one block of masked scores s [M, K] and values v [K, hd] into (acc, m, l)."""
    acc, m_prev, l_prev = carry
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = l_prev * correction + p.sum(axis=-1)
    acc = acc * correction[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_next, l_next


def _load_pages(ref, page_ids: jax.Array, block_k: int, dtype) -> jax.Array:
    """Pages `page_ids` of a [pages, page_size, hd] ref as [block_k, hd] in `dtype` (FP8
    pages are read in the query's dtype; their scales are applied outside the kernel)."""
    return ref[page_ids].reshape(block_k, ref.shape[-1]).astype(dtype)


def _attend_pages(q: jax.Array, q_pos: jax.Array, seq_len: jax.Array, page_table_ref,
                  page_base: jax.Array, k_ref,
                  v_ref, *, first, end, key_start, block_k: int, sm_scale: float,
                  soft_cap: float | None, sliding_window: int | None,
                  tail_window: int | None = None):
    """Online softmax of queries q [M, hd] at positions q_pos [M] over key blocks
    [first, cdiv(end, block_k)) of a page table whose first key sits at `key_start`; returns the
    unnormalised (acc, max, denominator). With `tail_window`, position 0 and the last
    `tail_window` positions up to each query are masked (`tail`); a query with no key left
    keeps max MASK_VALUE."""
    pages_per_block = block_k // k_ref.shape[-2]

    def body(j, carry):
        page_ids = page_base + page_table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        k = _load_pages(k_ref, page_ids, block_k, q.dtype)
        v = _load_pages(v_ref, page_ids, block_k, q.dtype)
        s = _scores(q, k, sm_scale, soft_cap)
        k_pos = key_start + j * block_k + jnp.arange(block_k)
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if sliding_window is not None:
            keep &= k_pos[None, :] > q_pos[:, None] - sliding_window
        if tail_window is not None:
            keep &= (k_pos[None, :] >= 1) & (k_pos[None, :] <= q_pos[:, None] - tail_window)
        s = jnp.where(keep, s, MASK_VALUE)
        return online_softmax_step(carry, s, v)

    rows, head_dim = q.shape
    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
    return lax.fori_loop(first, pl.cdiv(end, block_k), body, init)


def group_rows(ref, kv_head: jax.Array, group: int, rows: int):
    """The KV head's `group` query heads of a [Hq, hd] ref as a view of `rows` rows (the
    matrix rows the tensor cores need); rows past the group are masked (they may run past Hq)."""
    mask = jnp.broadcast_to(jnp.arange(rows)[:, None] < group, (rows, ref.shape[-1]))
    return ref.at[pl.ds(kv_head * group, rows), :], mask


def _decode_kernel(layer_ref, seq_len_ref, page_table_ref, q_ref, k_ref, v_ref, *refs,
                   sm_scale: float, soft_cap: float | None, sliding_window: int | None,
                   tail_window: int | None, pages_per_block: int, num_pages: int, group: int,
                   group_pad: int, write: bool, normalize: bool):
    """One (row, KV head, split). The query block holds all the row's heads [Hq, hd]; the
    program reads its group's rows (masked loads, no padded copy in HBM). With `write`, the
    row's new key/value (refs after the cache) are not read from the pages: split 0 folds them
    into its softmax from registers and stores them into their page slot. With `normalize`
    (one split) the output is final and stored straight into the group's rows of [Hq, hd]."""
    if write:
        slot_page_ref, slot_offset_ref, k_new_ref, v_new_ref, *refs = refs
    kv_head, split = pl.program_id(1), pl.program_id(2)
    page_base = layer_ref[0] * num_pages  # the cache is [L * N, ...]: layer l's pages follow
    page_size = k_ref.shape[-2]
    pages_per_split = page_table_ref.shape[0]
    block_k = pages_per_block * page_size
    seq_len = seq_len_ref[0]
    context = seq_len - 1 if write else seq_len  # keys read from the pages
    if tail_window is not None:  # the tail holds the last tail_window positions
        context = jnp.maximum(context - tail_window, 0)
    split_start = split * pages_per_split * page_size
    end = jnp.clip(context - split_start, 0, pages_per_split * page_size)
    first = 0
    if sliding_window is not None:  # the query sits at seq_len - 1
        first = jnp.maximum(seq_len - sliding_window - split_start, 0) // block_k
    q_rows, q_mask = group_rows(q_ref, kv_head, group, group_pad)
    q = pltriton.load(q_rows, mask=q_mask, other=0)
    q_pos = seq_len - 1 + jnp.zeros((q.shape[0],), jnp.int32)
    acc, m, denom = _attend_pages(
        q, q_pos, context, page_table_ref, page_base, k_ref, v_ref, first=first, end=end,
        key_start=split_start, block_k=block_k, sm_scale=sm_scale, soft_cap=soft_cap,
        sliding_window=sliding_window, tail_window=tail_window)
    if write:
        k_new, v_new = k_new_ref[...], v_new_ref[...]
        s_new = (q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :]).sum(-1) * sm_scale
        if soft_cap is not None:
            s_new = soft_cap * jnp.tanh(s_new / soft_cap)
        m_new = jnp.maximum(m, s_new)
        correction, p = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
        fold = (split == 0) & (seq_len > 0)
        acc = jnp.where(fold, acc * correction[:, None] + p[:, None] * v_new.astype(jnp.float32),
                        acc)
        denom = jnp.where(fold, denom * correction + p, denom)
        m = jnp.where(fold, m_new, m)
        *refs, k_out_ref, v_out_ref = refs

        @pl.when(fold)
        def _store():
            page, offset = page_base + slot_page_ref[0], slot_offset_ref[0]
            k_out_ref[page, offset] = k_new.astype(k_out_ref.dtype)
            v_out_ref[page, offset] = v_new.astype(v_out_ref.dtype)

    if normalize:
        (o_ref,) = refs
        o_rows, o_mask = group_rows(o_ref, kv_head, group, group_pad)
        out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
        pltriton.store(o_rows, out.astype(o_ref.dtype), mask=o_mask)
    else:
        acc_ref, m_ref, l_ref = refs
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, denom


def _prefill_kernel(layer_ref, q_len_ref, seq_len_ref, page_table_ref, q_ref, k_ref, v_ref,
                    o_ref, *lse_ref, sm_scale: float, soft_cap: float | None,
                    sliding_window: int | None, tail_window: int | None, block_k: int,
                    num_pages: int):
    q_block = pl.program_id(2)
    block_q = q_ref.shape[0]
    q_len, seq_len = q_len_ref[0], seq_len_ref[0]
    first_q = seq_len - q_len + q_block * block_q  # position of this block's first query
    live = q_block * block_q < q_len
    end = jnp.where(live, jnp.minimum(seq_len, first_q + block_q), 0)
    if tail_window is not None:  # the tail holds each query's last tail_window positions
        end = jnp.maximum(end - tail_window, 0)
    first = 0
    if sliding_window is not None:
        first = jnp.maximum(first_q - sliding_window + 1, 0) // block_k
    acc, m, denom = _attend_pages(
        q_ref[...], first_q + jnp.arange(block_q), seq_len, page_table_ref,
        layer_ref[0] * num_pages, k_ref, v_ref,
        first=first, end=end, key_start=0, block_k=block_k, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, tail_window=tail_window)
    valid = q_block * block_q + jnp.arange(block_q) < q_len
    if tail_window is not None:  # a query may have no key left: zeros and -inf
        valid &= m > 0.5 * MASK_VALUE
        (lse_ref,) = lse_ref
        lse_ref[...] = jnp.where(valid, m + jnp.log(jnp.where(valid, denom, 1.0)), -jnp.inf)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
    o_ref[...] = jnp.where(valid[:, None], out, 0.0).astype(o_ref.dtype)


def flat_pages(pages: jax.Array) -> jax.Array:
    """[L, N, page_size, Hkv, hd] -> [L * N, page_size, Hkv, hd] (a free reshape)."""
    return pages.reshape(-1, *pages.shape[2:])


def layer_array(layer: jax.Array) -> jax.Array:
    """The layer index as a [1] int32 kernel input (the kernels add layer * N to page ids)."""
    return jnp.asarray(layer, jnp.int32).reshape(1)


def pad_columns(page_tables: jax.Array, multiple: int) -> jax.Array:
    pad = -page_tables.shape[1] % multiple
    return jnp.pad(page_tables, ((0, 0), (0, pad))) if pad else page_tables


def query_tiles(width: int, block_q: int) -> tuple[int, int]:
    """(queries per program, padded row width) for rows of `width` queries: Triton's tiles are
    powers of two of at least `MIN_DOT_ROWS` rows, so a row width that is not one (a step's
    prefill blocks hold `block_q_for(T)` queries, T any token count in tests) is padded up to
    the next, and to a multiple of the tile. The engine's steps (T a power of two >= 16) never
    pad."""
    padded = max(MIN_DOT_ROWS, 1 << (width - 1).bit_length())
    block_q = min(block_q, padded)
    return block_q, -(-padded // block_q) * block_q


def default_num_splits(num_rows: int, num_kv_heads: int, num_blocks: int) -> int:
    """Enough context splits for about four programs per SM of a large GPU."""
    target = 512
    splits = max(1, target // max(num_rows * num_kv_heads, 1))
    return int(min(1 << (splits - 1).bit_length(), num_blocks))


def combine_splits(acc: jax.Array, m: jax.Array, denom: jax.Array,
                   with_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Merge per-split partial softmaxes [splits, ...] into normalised outputs; `with_lse`:
    (outputs, log-sum-exp), zeros and -inf where no split saw a key (max MASK_VALUE)."""
    m_all = m.max(axis=0)
    scale = jnp.exp(m - m_all[None])
    l_all = (denom * scale).sum(axis=0)
    out = (acc * scale[..., None]).sum(axis=0)
    out = out / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    if not with_lse:
        return out
    live = m_all > 0.5 * MASK_VALUE
    return (jnp.where(live[..., None], out, 0.0),
            jnp.where(live, m_all + jnp.log(jnp.where(live, l_all, 1.0)), -jnp.inf))


def _decode_call(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
                 seq_lens: jax.Array, page_tables: jax.Array, new_kv: tuple | None, *,
                 sm_scale: float, sliding_window: int | None, soft_cap: float | None,
                 tuning: DecodeTuning, interpret: bool, tail_window: int | None = None):
    rows, num_heads, head_dim = q.shape
    num_layers, num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    group_pad = max(MIN_DOT_ROWS, 1 << (group - 1).bit_length())
    pages_per_block = min(tuning.pages_per_block, 1 << (page_tables.shape[1] - 1).bit_length())
    pages_per_block = max(1, min(pages_per_block, MAX_BLOCK_TOKENS // page_size))
    stages = fit_stages(tuning.num_stages,
                         2 * pages_per_block * page_size * head_dim * k_pages.dtype.itemsize)
    num_blocks = pl.cdiv(page_tables.shape[1], pages_per_block)
    splits = tuning.num_splits or default_num_splits(rows, num_kv_heads, num_blocks)
    splits = min(splits, num_blocks)
    page_tables = pad_columns(page_tables, splits * pages_per_block)
    pages_per_split = page_tables.shape[1] // splits
    cache_spec = pl.BlockSpec((num_layers * num_pages, page_size, None, head_dim),
                              lambda r, h, s: (0, 0, h, 0))
    row_spec = pl.BlockSpec((1,), lambda r, h, s: (r,))
    in_specs = [
        pl.BlockSpec((1,), lambda r, h, s: (0,)), row_spec,
        pl.BlockSpec((None, pages_per_split), lambda r, h, s: (r, s)),
        pl.BlockSpec((None, num_heads, head_dim), lambda r, h, s: (r, 0, 0)),
        cache_spec, cache_spec,
    ]
    args = [layer_array(layer), seq_lens, page_tables, q, flat_pages(k_pages),
            flat_pages(v_pages)]
    normalize = splits == 1 and tail_window is None  # the tail needs the log-sum-exp
    if normalize:
        out_specs = [pl.BlockSpec((None, num_heads, head_dim), lambda r, h, s: (r, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((rows, num_heads, head_dim), q.dtype)]
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, group_pad, head_dim),
                         lambda r, h, s: (s, r, h, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda r, h, s: (s, r, h, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda r, h, s: (s, r, h, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((splits, rows, num_kv_heads, group_pad, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, num_kv_heads, group_pad), jnp.float32),
            jax.ShapeDtypeStruct((splits, rows, num_kv_heads, group_pad), jnp.float32),
        ]
    aliases = {}
    if new_kv is not None:
        k_new, v_new, slot_pages, slot_offsets = new_kv
        new_spec = pl.BlockSpec((None, None, head_dim), lambda r, h, s: (r, h, 0))
        in_specs += [row_spec, row_spec, new_spec, new_spec]  # padding rows never store
        args += [slot_pages, slot_offsets, k_new, v_new]
        out_specs += [cache_spec, cache_spec]
        out_shape += [jax.ShapeDtypeStruct(args[4].shape, k_pages.dtype),
                      jax.ShapeDtypeStruct(args[5].shape, v_pages.dtype)]
        aliases = {4: len(out_shape) - 2, 5: len(out_shape) - 1}
    kernel = functools.partial(_decode_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, tail_window=tail_window,
                               pages_per_block=pages_per_block, num_pages=num_pages,
                               group=group, group_pad=group_pad, write=new_kv is not None,
                               normalize=normalize)
    outs = pl.pallas_call(
        kernel,
        grid=(rows, num_kv_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=stages),
        interpret=interpret,
        name="paged_attention_decode",
    )(*args)
    if normalize:
        out = outs[0]
    elif tail_window is not None:  # float32 output and log-sum-exp [R, Hq]
        out, lse = combine_splits(*outs[:3], with_lse=True)
        return (out[:, :, :group].reshape(rows, num_heads, head_dim),
                lse[:, :, :group].reshape(rows, num_heads))
    else:
        out = combine_splits(*outs[:3])[:, :, :group].reshape(rows, num_heads, head_dim)
        out = out.astype(q.dtype)
    if new_kv is None:
        return out
    return out, outs[-2].reshape(k_pages.shape), outs[-1].reshape(v_pages.shape)


def decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
           seq_lens: jax.Array, page_tables: jax.Array, *, sm_scale: float,
           sliding_window: int | None = None, soft_cap: float | None = None,
           tuning: DecodeTuning = DecodeTuning(), interpret: bool = False,
           tail_window: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One query token per row, its key already in the pages: q [R, Hq, hd] -> [R, Hq, hd].
    With `tail_window` (`tail`): the tail's positions left out, (output float32, log-sum-exp
    [R, Hq])."""
    return _decode_call(q, k_pages, v_pages, layer, seq_lens, page_tables, None,
                        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                        tuning=tuning, interpret=interpret, tail_window=tail_window)


def decode_and_write(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, layer: jax.Array, seq_lens: jax.Array,
                     page_tables: jax.Array, slot_pages: jax.Array, slot_offsets: jax.Array, *,
                     sm_scale: float, sliding_window: int | None = None,
                     soft_cap: float | None = None, tuning: DecodeTuning = DecodeTuning(),
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`decode` for rows whose new key/value k_new, v_new [R, Hkv, hd] (position
    seq_len - 1) are not yet in the pages: the kernel attends to them from registers and
    stores them at (slot_pages, slot_offsets), in place (the caches are aliased to the
    outputs). Returns (out [R, Hq, hd], k_pages, v_pages)."""
    return _decode_call(q, k_pages, v_pages, layer, seq_lens, page_tables,
                        (k_new, v_new, slot_pages, slot_offsets), sm_scale=sm_scale,
                        sliding_window=sliding_window, soft_cap=soft_cap, tuning=tuning,
                        interpret=interpret)


def prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array,
            q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
            sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
            tuning: PrefillTuning = PrefillTuning(), interpret: bool = False,
            tail_window: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Rows of up to Q query tokens (the last q_len of each row's context): q [R, Q, Hq, hd]
    -> [R, Q, Hq, hd], zeros past q_len. The rows are the step's prefill blocks (`ragged`:
    Q = `block_q_for(T)`), or any rows of queries. With `tail_window` (`tail`): the tail's
    positions left out, (output, log-sum-exp [R, Q, Hq])."""
    rows, width, num_heads, head_dim = q.shape
    block_q, padded = query_tiles(width, tuning.block_q)
    if padded != width:
        q = jnp.pad(q, ((0, 0), (0, padded - width), (0, 0), (0, 0)))
        outs = prefill(q, k_pages, v_pages, layer, q_lens, seq_lens, page_tables,
                       sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                       tuning=tuning, interpret=interpret, tail_window=tail_window)
        return jax.tree.map(lambda x: x[:, :width], outs)
    num_layers, num_pages, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads
    block_k = max(tuning.block_k, page_size)
    if block_k % page_size:
        raise ValueError(f"block_k {block_k} is not a multiple of the page size {page_size}")
    page_tables = pad_columns(page_tables, block_k // page_size)
    stages = fit_stages(tuning.num_stages, 2 * block_k * head_dim * k_pages.dtype.itemsize
                         + block_q * head_dim * q.dtype.itemsize)
    cache_spec = pl.BlockSpec((num_layers * num_pages, page_size, None, head_dim),
                              lambda r, h, b: (0, 0, h // group, 0))
    token_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda r, h, b: (r, b, h, 0))
    kernel = functools.partial(_prefill_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, tail_window=tail_window,
                               block_k=block_k, num_pages=num_pages)
    out_specs, out_shape = token_spec, jax.ShapeDtypeStruct(q.shape, q.dtype)
    if tail_window is not None:  # and each query's log-sum-exp [R, Q, Hq]
        out_specs = (token_spec, pl.BlockSpec((None, block_q, None), lambda r, h, b: (r, b, h)))
        out_shape = (out_shape, jax.ShapeDtypeStruct(q.shape[:3], jnp.float32))
    return pl.pallas_call(
        kernel,
        grid=(rows, num_heads, width // block_q),
        in_specs=[
            pl.BlockSpec((1,), lambda r, h, b: (0,)),
            pl.BlockSpec((1,), lambda r, h, b: (r,)),
            pl.BlockSpec((1,), lambda r, h, b: (r,)),
            pl.BlockSpec((None, page_tables.shape[1]), lambda r, h, b: (r, 0)),
            token_spec, cache_spec, cache_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=stages),
        interpret=interpret,
        name="paged_attention_prefill",
    )(layer_array(layer), q_lens, seq_lens, page_tables, q, flat_pages(k_pages),
      flat_pages(v_pages))


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           layer: jax.Array, rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           decode_tuning: DecodeTuning = DecodeTuning(),
                           prefill_tuning: PrefillTuning = PrefillTuning(),
                           interpret: bool = False, tail_window: int | None = None
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The step's attention [T, Hq, hd] (same contract as the reference)."""
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  interpret=interpret, tail_window=tail_window)

    def attend_decode(row_q, _, row_seq_lens, row_tables):
        outs = decode(row_q[:, 0], k_pages, v_pages, layer, row_seq_lens, row_tables,
                      tuning=decode_tuning, **kwargs)
        return jax.tree.map(lambda x: x[:, None], outs)

    def attend_prefill(row_q, row_q_lens, row_seq_lens, row_tables):
        return prefill(row_q, k_pages, v_pages, layer, row_q_lens, row_seq_lens, row_tables,
                       tuning=prefill_tuning, **kwargs)

    return attend_ragged(q, rows, attend_prefill=attend_prefill, attend_decode=attend_decode)


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, layer: jax.Array, rows: RaggedRows,
                     slot_pages: jax.Array, slot_offsets: jax.Array, *, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     decode_tuning: DecodeTuning = DecodeTuning(),
                     prefill_tuning: PrefillTuning = PrefillTuning(),
                     interpret: bool = False, tail_window: int | None = None) -> tuple:
    """The step's attention with its K/V writes (contract: the dispatcher's
    `write_and_attend`). A decode-only step's tokens are written by the decode kernel itself,
    so it has no separate write at all; a step with prefill blocks scatters every token into
    its page first, then the kernels read them with the rest of the context. With
    `tail_window` (`tail`) every step scatters first (the new token is the tail's), and the
    output is (out, log-sum-exp)."""
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  interpret=interpret)
    if tail_window is not None:
        kwargs["tail_window"] = tail_window
    elif rows.decode_only:
        return decode_and_write(q, k, v, k_pages, v_pages, layer, rows.decode_seq_lens,
                                rows.page_tables, slot_pages, slot_offsets,
                                tuning=decode_tuning, **kwargs)
    k_pages, v_pages = write_pages(k_pages, v_pages, layer, k, v, slot_pages, slot_offsets)
    out = ragged_paged_attention(q, k_pages, v_pages, layer, rows, decode_tuning=decode_tuning,
                                 prefill_tuning=prefill_tuning, **kwargs)
    return out, k_pages, v_pages
