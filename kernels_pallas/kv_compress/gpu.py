"""Paged attention reading TurboQuant codes on NVIDIA GPUs: Pallas kernels lowered through Triton.

The kernels never rebuild keys or values in memory. A TurboQuant key is
k = mean + ||k~|| R^T (y + c ||r|| S^T s) (`codecs.turboquant`: y the grid values of its MSE codes,
s its QJL signs, c = sqrt(pi/2) / m), so with the query rotated once outside the kernel,
q_rot = R q and q_sketch = S q_rot,

    q.k = q.mean + ||k~|| (q_rot . y + c ||r|| q_sketch . s)

and a key's score needs only its codes: bit planes unpacked in registers, grid values looked up
from a table of 2**bits floats, two tensor-core dots. Values are averaged in the rotated domain,
sum_j p_j ||v_j|| y_j, and rotated back (and their mean added) once per query after the kernel.
So a block of keys costs its code bytes (about a quarter of bfloat16's at 4 bits) plus ALU work
to unpack them; nothing of head_dim x context size is ever written.

Layout and grid as `kernels_pallas.paged_attention.gpu`: `decode` is one program per (decode
row, KV head, context split) with the KV head's query heads as matrix rows; `prefill` one per
(prefill block, query head, tile of the block's queries), the rows of both being the step's
(`paged_attention.ragged`). The step's keys and values are encoded and
scattered into their pages first (`reference.write_codes`, in place). Why Triton and not
Mosaic GPU: the same as the plain kernels (the kernel bodies run under Pallas' interpret mode
in the CPU tests).
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

from kernels_pallas.codecs import bitpack
from kernels_pallas.codecs.kv import CompressedPages, KvCompressor
from kernels_pallas.codecs.turboquant import TurboQuantCompressor
from kernels_pallas.kv_compress.reference import write_codes
from kernels_pallas.kv_compress.rotated import rotated_queries, values_out
from kernels_pallas.paged_attention.gpu import (
    MASK_VALUE,
    MIN_DOT_ROWS,
    combine_splits,
    default_num_splits,
    dot,
    fit_stages,
    group_rows,
    layer_array,
    pad_columns,
    query_tiles,
)
from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged


@dataclasses.dataclass(frozen=True)
class CodeTuning:
    """Defaults: the fastest of `benchmarks/kv_compression_gpu.py`'s tunings on a Hopper GPU."""

    pages_per_block: int = 4  # pages per loop step (block_k = pages_per_block * page_size)
    num_splits: int | None = None  # decode context splits; None picks from batch and context
    num_warps: int = 4
    num_stages: int = 3
    block_q: int = 64  # prefill queries per program


def kernel_supports(key: KvCompressor, value: KvCompressor) -> str | None:
    """None if the kernels read codes of these (key, value) compressors, else why not."""
    if not (isinstance(key, TurboQuantCompressor) and isinstance(value, TurboQuantCompressor)):
        return (f"the kernels read TurboQuant codes (turboquant-<b>, turboquant-mse-<b>), not "
                f"{key.name} keys / {value.name} values")
    if key.mse_bits == 0 or value.mse_bits == 0 or value.qjl_dim:
        return "the kernels need an MSE stage on keys and values and no QJL stage on values"
    for what, n in (("head_dim", key.head_dim), ("qjl_dim", key.qjl_dim)):
        if n and (n < MIN_DOT_ROWS or (n % bitpack.GROUP and bitpack.GROUP % n)):
            return f"the kernels need {what} to be 16 or a multiple of 32, not {n}"
    return None


def _unpack(load, bits: int, n: int, rows: int) -> jax.Array:
    """int32 codes [rows, n] from packed words (`codecs.bitpack`): fields for b dividing 32 (one
    shift and mask per code), else bit planes (word g * bits + j holds bit j of codes
    32g..32g+31). `load(words)` reads the rows' words (all of them for None, else a slice)."""
    if bitpack.is_fields(bits):
        per_word = min(n, bitpack.GROUP // bits)
        words = load(None).reshape(rows, n // per_word, 1)
        shifts = bits * lax.broadcasted_iota(jnp.uint32, (1, 1, per_word), 2)
        return ((words >> shifts) & ((1 << bits) - 1)).reshape(rows, n).astype(jnp.int32)
    groups, per_word = -(-n // bitpack.GROUP), min(n, bitpack.GROUP)
    shifts = lax.broadcasted_iota(jnp.uint32, (1, 1, per_word), 2)
    code = None
    for j in range(bits):
        words = load(pl.ds(j, groups, stride=bits)).reshape(rows, groups, 1)
        plane = ((words >> shifts) & 1).reshape(rows, n)
        code = plane if code is None else code | (plane << j)
    return code.astype(jnp.int32)


def _page_words(ref, page_ids: jax.Array):
    """`_unpack`'s loader for the pages `page_ids` of a [pages, page_size, words] ref."""
    return lambda sl: ref[page_ids] if sl is None else ref[page_ids, :, sl]


def _norms(ref, page_ids: jax.Array, block_k: int) -> jax.Array:
    return ref[page_ids].reshape(block_k).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Codes:
    """A kernel's code refs by name: key arrays, value arrays, the two grids."""

    k: dict
    v: dict
    k_grid: object
    v_grid: object


def _names(key: TurboQuantCompressor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The code arrays the kernels read, keys' then values'."""
    qjl = ("signs", "residual_norm") if key.qjl_dim else ()
    return ("norm", "mse", *qjl), ("norm", "mse")


def _take_codes(refs, key: TurboQuantCompressor):
    """Split a kernel's refs into (`_Codes`, the refs after them)."""
    key_names, value_names = _names(key)
    nk, nv = len(key_names), len(value_names)
    codes = _Codes(dict(zip(key_names, refs[:nk], strict=True)),
                   dict(zip(value_names, refs[nk:nk + nv], strict=True)), *refs[nk + nv:nk + nv + 2])
    return codes, refs[nk + nv + 2:]


def _key_scores(q_rot, q_sketch, bias, load, norms, codes: _Codes, key: TurboQuantCompressor,
                rows: int, sm_scale: float, soft_cap: float | None) -> jax.Array:
    """Scores [M, rows] of queries against `rows` keys read by load(name)(words)/norms(name)."""
    dtype = q_rot.dtype
    y = codes.k_grid[_unpack(load("mse"), key.mse_bits, key.head_dim, rows)]
    if rows >= MIN_DOT_ROWS:
        s = dot(q_rot, y, trans_b=True)
    else:  # the step's own key, one row: no tensor-core shape
        s = (q_rot.astype(jnp.float32) * y.astype(jnp.float32)).sum(-1, keepdims=True)
    if key.qjl_dim:
        signs = (2 * _unpack(load("signs"), 1, key.qjl_dim, rows) - 1).astype(dtype)
        if rows >= MIN_DOT_ROWS:
            sketch = dot(q_sketch, signs, trans_b=True)
        else:
            sketch = (q_sketch.astype(jnp.float32) * signs.astype(jnp.float32)).sum(
                -1, keepdims=True)
        qjl_scale = float(np.sqrt(np.pi / 2) / key.qjl_dim)
        s += (qjl_scale * norms("residual_norm"))[None, :] * sketch
    s = (bias[:, None] + norms("norm")[None, :] * s) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def _attend_codes(q_rot, q_sketch, bias, q_pos, seq_len, page_table_ref, page_base,
                  codes: _Codes, *, first, end, key_start, block_k: int, sm_scale: float,
                  soft_cap: float | None, sliding_window: int | None, key: TurboQuantCompressor,
                  value: TurboQuantCompressor, tail_window: int | None):
    """Online softmax of rotated queries q_rot [M, hd] (sketches q_sketch [M, m], score offsets
    bias [M]) at positions q_pos over key blocks [first, cdiv(end, block_k)); returns the
    unnormalised (rotated-domain acc [M, hd], max, denominator). With `tail_window`, position
    0 and each query's last `tail_window` positions are masked (`paged_attention.tail`)."""
    page_size = codes.k["norm"].shape[-1]
    pages_per_block = block_k // page_size
    head_dim, dtype = q_rot.shape[-1], q_rot.dtype

    def body(j, carry):
        acc, m_prev, l_prev = carry
        ids = page_base + page_table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        s = _key_scores(q_rot, q_sketch, bias, lambda name: _page_words(codes.k[name], ids),
                        lambda name: _norms(codes.k[name], ids, block_k), codes, key, block_k,
                        sm_scale, soft_cap)
        k_pos = key_start + j * block_k + jnp.arange(block_k)
        keep = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < seq_len)
        if sliding_window is not None:
            keep &= k_pos[None, :] > q_pos[:, None] - sliding_window
        if tail_window is not None:
            keep &= (k_pos[None, :] >= 1) & (k_pos[None, :] <= q_pos[:, None] - tail_window)
        s = jnp.where(keep, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = l_prev * correction + p.sum(axis=-1)
        yv = codes.v_grid[_unpack(_page_words(codes.v["mse"], ids), value.mse_bits, head_dim,
                                  block_k)]
        pv = (p * _norms(codes.v["norm"], ids, block_k)[None, :]).astype(dtype)
        return acc * correction[:, None] + dot(pv, yv), m_next, l_next

    rows = q_rot.shape[0]
    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32))
    return lax.fori_loop(first, pl.cdiv(end, block_k), body, init)


def _decode_kernel(layer_ref, seq_len_ref, page_table_ref, q_rot_ref, q_sketch_ref, bias_ref,
                   *refs, num_pages: int, group: int, group_pad: int, normalize: bool,
                   **kwargs):
    """One (row, KV head, split); query heads of the KV head as `group_pad` masked rows."""
    key = kwargs["key"]
    codes, refs = _take_codes(refs, key)
    kv_head, split = pl.program_id(1), pl.program_id(2)
    page_size = codes.k["norm"].shape[-1]
    pages_per_split = page_table_ref.shape[0]
    block_k = kwargs["block_k"]
    page_base = layer_ref[0] * num_pages
    seq_len = seq_len_ref[0]
    split_start = split * pages_per_split * page_size
    context = seq_len  # keys read from the pages; a tail holds the last tail_window
    if kwargs["tail_window"] is not None:
        context = jnp.maximum(seq_len - kwargs["tail_window"], 0)
    end = jnp.clip(context - split_start, 0, pages_per_split * page_size)
    first = 0
    if kwargs["sliding_window"] is not None:
        first = jnp.maximum(seq_len - kwargs["sliding_window"] - split_start, 0) // block_k
    q_rows, q_mask = group_rows(q_rot_ref, kv_head, group, group_pad)
    s_rows, s_mask = group_rows(q_sketch_ref, kv_head, group, group_pad)
    b_rows = bias_ref.at[pl.ds(kv_head * group, group_pad)]
    q_rot = pltriton.load(q_rows, mask=q_mask, other=0)
    q_sketch = pltriton.load(s_rows, mask=s_mask, other=0)
    bias = pltriton.load(b_rows, mask=jnp.arange(group_pad) < group, other=0)
    q_pos = seq_len - 1 + jnp.zeros((group_pad,), jnp.int32)
    acc, m, denom = _attend_codes(
        q_rot, q_sketch, bias, q_pos, seq_len, page_table_ref, page_base, codes, first=first,
        end=end, key_start=split_start, **kwargs)
    if normalize:
        (o_ref,) = refs
        o_rows, o_mask = group_rows(o_ref, kv_head, group, group_pad)
        pltriton.store(o_rows, acc / jnp.where(denom > 0, denom, 1.0)[:, None], mask=o_mask)
    else:
        acc_ref, m_ref, l_ref = refs
        acc_ref[...], m_ref[...], l_ref[...] = acc, m, denom


def _prefill_kernel(layer_ref, q_len_ref, seq_len_ref, page_table_ref, q_rot_ref, q_sketch_ref,
                    bias_ref, *refs, num_pages: int, **kwargs):
    codes, (o_ref, *lse_ref) = _take_codes(refs, kwargs["key"])
    q_block = pl.program_id(2)
    block_q, block_k = q_rot_ref.shape[0], kwargs["block_k"]
    q_len, seq_len = q_len_ref[0], seq_len_ref[0]
    first_q = seq_len - q_len + q_block * block_q
    end = jnp.where(q_block * block_q < q_len, jnp.minimum(seq_len, first_q + block_q), 0)
    if kwargs["tail_window"] is not None:  # the tail holds each query's last positions
        end = jnp.maximum(end - kwargs["tail_window"], 0)
    first = 0
    if kwargs["sliding_window"] is not None:
        first = jnp.maximum(first_q - kwargs["sliding_window"] + 1, 0) // block_k
    acc, m, denom = _attend_codes(
        q_rot_ref[...], q_sketch_ref[...], bias_ref[...], first_q + jnp.arange(block_q),
        seq_len, page_table_ref, layer_ref[0] * num_pages, codes, first=first, end=end,
        key_start=0, **kwargs)
    out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]
    if kwargs["tail_window"] is not None:  # a query may have no key left: zeros and -inf
        live = m > 0.5 * MASK_VALUE
        out = jnp.where(live[:, None], out, 0.0)
        (lse_ref,) = lse_ref
        lse_ref[...] = jnp.where(live, m + jnp.log(jnp.where(live, denom, 1.0)), -jnp.inf)
    o_ref[...] = out


def _code_arrays(kv: CompressedPages, dtype) -> list[jax.Array]:
    """The kernels' code inputs: the arrays of `_names` as [L * N, page_size, Hkv, ...], then
    the two grids in the queries' dtype (looked up straight into tensor-core operands)."""
    key_names, value_names = _names(kv.key_compressor)
    return [*(kv.k[n].reshape(-1, *kv.k[n].shape[2:]) for n in key_names),
            *(kv.v[n].reshape(-1, *kv.v[n].shape[2:]) for n in value_names),
            jnp.asarray(kv.key_compressor.grid, dtype),
            jnp.asarray(kv.value_compressor.grid, dtype)]


def _cache_spec(a: jax.Array, head) -> pl.BlockSpec:
    """The whole cache array [L * N, page_size, Hkv, ...] of one KV head (`head(*ids)`)."""
    return pl.BlockSpec((a.shape[0], a.shape[1], None, *a.shape[3:]),
                        lambda *ids: (0, 0, head(*ids), *(0,) * (a.ndim - 3)))


def _code_specs(arrays: list[jax.Array], head) -> list[pl.BlockSpec]:
    """Whole-cache blocks of one KV head, whole grids."""
    return ([_cache_spec(a, head) for a in arrays[:-2]]
            + [pl.BlockSpec(g.shape, lambda *ids: (0,)) for g in arrays[-2:]])


def _stages(tuning: CodeTuning, block_k: int, kv: CompressedPages) -> int:
    page_bytes = sum(a.dtype.itemsize * int(np.prod(a.shape[3:]))
                     for codes in (kv.k, kv.v) for a in codes.values())
    return fit_stages(tuning.num_stages, block_k * page_bytes * 4)  # unpacked tiles too


def _kernel_kwargs(kv, sm_scale, sliding_window, soft_cap, block_k, tail_window=None):
    return dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                block_k=block_k, key=kv.key_compressor, value=kv.value_compressor,
                tail_window=tail_window)


def _decode_call(q_rot, q_sketch, bias, kv: CompressedPages, layer, seq_lens, page_tables,
                 *, sm_scale, sliding_window, soft_cap, tuning: CodeTuning, interpret,
                 tail_window=None):
    rows, num_heads, head_dim = q_rot.shape
    num_pages, page_size, num_kv_heads = kv.num_pages, kv.page_size, kv.k["norm"].shape[3]
    group = num_heads // num_kv_heads
    group_pad = max(MIN_DOT_ROWS, 1 << (group - 1).bit_length())
    pages_per_block = min(tuning.pages_per_block, 1 << (page_tables.shape[1] - 1).bit_length())
    pages_per_block = max(1, min(pages_per_block, 128 // page_size))
    block_k = pages_per_block * page_size
    num_blocks = pl.cdiv(page_tables.shape[1], pages_per_block)
    splits = min(tuning.num_splits or default_num_splits(rows, num_kv_heads, num_blocks),
                 num_blocks)
    page_tables = pad_columns(page_tables, splits * pages_per_block)
    pages_per_split = page_tables.shape[1] // splits
    arrays = _code_arrays(kv, q_rot.dtype)
    row_spec = pl.BlockSpec((1,), lambda r, h, s: (r,))
    in_specs = [
        pl.BlockSpec((1,), lambda r, h, s: (0,)), row_spec,
        pl.BlockSpec((None, pages_per_split), lambda r, h, s: (r, s)),
        pl.BlockSpec((None, num_heads, head_dim), lambda r, h, s: (r, 0, 0)),
        pl.BlockSpec((None, num_heads, q_sketch.shape[-1]), lambda r, h, s: (r, 0, 0)),
        pl.BlockSpec((None, num_heads), lambda r, h, s: (r, 0)),
        *_code_specs(arrays, lambda r, h, s: h),
    ]
    args = [layer_array(layer), seq_lens, page_tables, q_rot, q_sketch,
            bias.astype(jnp.float32), *arrays]
    normalize = splits == 1 and tail_window is None  # the tail needs the log-sum-exp
    if normalize:
        out_specs = [pl.BlockSpec((None, num_heads, head_dim), lambda r, h, s: (r, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((rows, num_heads, head_dim), jnp.float32)]
    else:
        part = (splits, rows, num_kv_heads, group_pad)
        out_specs = [
            pl.BlockSpec((None, None, None, group_pad, head_dim),
                         lambda r, h, s: (s, r, h, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda r, h, s: (s, r, h, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda r, h, s: (s, r, h, 0)),
        ]
        out_shape = [jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
    kernel = functools.partial(
        _decode_kernel, num_pages=num_pages, group=group, group_pad=group_pad,
        normalize=normalize,
        **_kernel_kwargs(kv, sm_scale, sliding_window, soft_cap, block_k, tail_window))
    outs = pl.pallas_call(
        kernel, grid=(rows, num_kv_heads, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=_stages(tuning, block_k, kv)),
        interpret=interpret, name="compressed_attention_decode",
    )(*args)
    if normalize:
        return outs[0]
    if tail_window is not None:  # and the log-sum-exp [R, Hq]
        out, lse = combine_splits(*outs, with_lse=True)
        return (out[:, :, :group].reshape(rows, num_heads, head_dim),
                lse[:, :, :group].reshape(rows, num_heads))
    return combine_splits(*outs)[:, :, :group].reshape(rows, num_heads, head_dim)


def decode(q_rot: jax.Array, q_sketch: jax.Array, bias: jax.Array, kv: CompressedPages,
           layer: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *, sm_scale: float,
           sliding_window: int | None = None, soft_cap: float | None = None,
           tuning: CodeTuning = CodeTuning(), interpret: bool = False,
           tail_window: int | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """One query per row (its key already in the pages): rotated queries q_rot [R, Hq, hd],
    sketches [R, Hq, m], offsets bias [R, Hq] -> rotated-domain outputs [R, Hq, hd] float32;
    with `tail_window`, (outputs, log-sum-exp [R, Hq]) of the positions the tail does not hold."""
    return _decode_call(q_rot, q_sketch, bias, kv, layer, seq_lens, page_tables,
                        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                        tuning=tuning, interpret=interpret, tail_window=tail_window)


def prefill(q_rot: jax.Array, q_sketch: jax.Array, bias: jax.Array, kv: CompressedPages,
            layer: jax.Array, q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array,
            *, sm_scale: float, sliding_window: int | None = None,
            soft_cap: float | None = None, tuning: CodeTuning = CodeTuning(),
            interpret: bool = False, tail_window: int | None = None
            ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Rows of up to Q queries: q_rot [R, Q, Hq, hd], q_sketch [R, Q, Hq, m], bias [R, Q, Hq]
    -> rotated-domain outputs [R, Q, Hq, hd] float32 (garbage past q_len: mask it); with
    `tail_window`, (outputs, log-sum-exp [R, Q, Hq]) of the positions the tail does not hold."""
    rows, width, num_heads, head_dim = q_rot.shape
    block_q, padded = query_tiles(width, tuning.block_q)
    if padded != width:  # Triton's tiles: a power of two of at least 16 queries
        pad = ((0, 0), (0, padded - width))
        outs = prefill(*(jnp.pad(a, pad + ((0, 0),) * (a.ndim - 2))
                         for a in (q_rot, q_sketch, bias)), kv, layer, q_lens, seq_lens,
                       page_tables, sm_scale=sm_scale, sliding_window=sliding_window,
                       soft_cap=soft_cap, tuning=tuning, interpret=interpret,
                       tail_window=tail_window)
        return jax.tree.map(lambda x: x[:, :width], outs)
    page_size, num_kv_heads = kv.page_size, kv.k["norm"].shape[3]
    group = num_heads // num_kv_heads
    block_k = max(tuning.pages_per_block * page_size, page_size)
    page_tables = pad_columns(page_tables, block_k // page_size)
    arrays = _code_arrays(kv, q_rot.dtype)

    def tokens(last):
        return pl.BlockSpec((None, block_q, None, *last), lambda r, h, b: (r, b, h, *(0,) * len(last)))

    kernel = functools.partial(_prefill_kernel, num_pages=kv.num_pages,
                               **_kernel_kwargs(kv, sm_scale, sliding_window, soft_cap, block_k,
                                                tail_window))
    out_specs, out_shape = tokens((head_dim,)), jax.ShapeDtypeStruct(q_rot.shape, jnp.float32)
    if tail_window is not None:  # and each query's log-sum-exp [R, Q, Hq]
        out_specs = (out_specs, tokens(()))
        out_shape = (out_shape, jax.ShapeDtypeStruct(q_rot.shape[:3], jnp.float32))
    return pl.pallas_call(
        kernel, grid=(rows, num_heads, width // block_q),
        in_specs=[
            pl.BlockSpec((1,), lambda r, h, b: (0,)), pl.BlockSpec((1,), lambda r, h, b: (r,)),
            pl.BlockSpec((1,), lambda r, h, b: (r,)),
            pl.BlockSpec((None, page_tables.shape[1]), lambda r, h, b: (r, 0)),
            tokens((head_dim,)), tokens((q_sketch.shape[-1],)), tokens(()),
            *_code_specs(arrays, lambda r, h, b: h // group),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=_stages(tuning, block_k, kv)),
        interpret=interpret, name="compressed_attention_prefill",
    )(layer_array(layer), q_lens, seq_lens, page_tables, q_rot, q_sketch,
      bias.astype(jnp.float32), *arrays)


def _check_supported(kv: CompressedPages) -> None:
    reason = kernel_supports(kv.key_compressor, kv.value_compressor)
    if reason:
        raise ValueError(reason)


def _decode_values(out_rot: jax.Array, kv: CompressedPages, layer: jax.Array,
                   q_lens: jax.Array) -> jax.Array:
    """Decode rows' rotated-domain outputs [R, Hq, hd] as values; padding rows give zeros."""
    return jnp.where((q_lens > 0)[:, None, None], values_out(out_rot, kv, layer), 0.0)


def _prefill_values(rows: jax.Array, kv: CompressedPages, layer: jax.Array,
                    q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array,
                    **kwargs) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`prefill` on query rows [R, Q, Hq, hd], read back as values; zeros past q_len (and,
    with a tail, the log-sum-exp beside them: -inf past q_len)."""
    outs = prefill(*rotated_queries(rows, kv, layer), kv, layer, q_lens, seq_lens, page_tables,
                   **kwargs)
    out, lse = outs if isinstance(outs, tuple) else (outs, None)
    valid = jnp.arange(rows.shape[1])[None, :] < q_lens[:, None]
    values = jnp.where(valid[:, :, None, None], values_out(out, kv, layer), 0.0)
    if lse is None:
        return values
    return values, jnp.where(valid[:, :, None], lse, -jnp.inf)


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, kv: CompressedPages,
                     layer: jax.Array, rows: RaggedRows, slot_pages: jax.Array,
                     slot_offsets: jax.Array, *, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     tuning: CodeTuning = CodeTuning(), interpret: bool = False,
                     tail_window: int | None = None) -> tuple:
    """The step's attention with its code writes (contract: `kv_compress.write_and_attend`):
    every token's codes are scattered into their pages (in place, the cache donated), then
    the kernels read them with the rest of the context. (A decode kernel that stored its row's
    codes itself, as the plain one does, is slower per call.) With `tail_window`, the
    attention is (output float32, log-sum-exp) of the positions a tail does not hold."""
    _check_supported(kv)  # before the cache is written
    kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
    return ragged_paged_attention(q, kv, layer, rows, sm_scale=sm_scale,
                                  sliding_window=sliding_window, soft_cap=soft_cap,
                                  tuning=tuning, interpret=interpret,
                                  tail_window=tail_window), kv


def ragged_paged_attention(q: jax.Array, kv: CompressedPages, layer: jax.Array,
                           rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           tuning: CodeTuning = CodeTuning(), interpret: bool = False,
                           tail_window: int | None = None
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The step's attention [T, Hq, hd] over codes (contract: `reference.ragged_paged_attention`)."""
    _check_supported(kv)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  tuning=tuning, interpret=interpret, tail_window=tail_window)

    def attend_decode(row_q, row_q_lens, row_seq_lens, row_tables):
        outs = decode(*rotated_queries(row_q[:, 0], kv, layer), kv, layer, row_seq_lens,
                      row_tables, **kwargs)
        if tail_window is None:
            return _decode_values(outs, kv, layer, row_q_lens)[:, None]
        out, lse = outs
        live = (row_q_lens > 0)[:, None]
        return (_decode_values(out, kv, layer, row_q_lens)[:, None],
                jnp.where(live, lse, -jnp.inf)[:, None])

    def attend_prefill(row_q, row_q_lens, row_seq_lens, row_tables):
        return _prefill_values(row_q, kv, layer, row_q_lens, row_seq_lens, row_tables,
                               **kwargs)

    out = attend_ragged(q, rows, attend_prefill=attend_prefill, attend_decode=attend_decode)
    return out if tail_window is not None else out.astype(q.dtype)
