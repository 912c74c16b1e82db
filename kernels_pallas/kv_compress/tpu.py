"""Paged attention reading TurboQuant MSE codes on TPUs: a Pallas Mosaic TPU kernel.

The scheme of `gpu.py` (scores from rotated queries, values averaged in the rotated domain and
rotated back after the kernel) laid out for a TPU's vector units, which have no gather:

- Codes packed as fields (`codecs.bitpack`, b dividing 32) are never rebuilt into a
  [keys, head_dim] tile. Field i of a word array [page_size, W] is one shift and mask, and holds
  the codes of elements {w * (32 / b) + i}: a [page_size, W] tile. The queries are permuted to
  the same field-major order outside the kernel, so a score is a sum over fields of
  [rows, W] x [W, page_size] matmuls, and the value accumulator is kept field-major too.
- Grid values come from a select chain over the 2**b levels (constants in the kernel), not
  a table lookup.

Grid, scalar prefetch and pipelining follow `kernels_pallas.paged_attention.tpu`: grid (row,
page), each step's block is one page of every KV head's codes chosen through the page table.
The step's new codes are scattered into their pages first (`reference.write_codes`).

Scope: caches whose keys and values are MSE-stage TurboQuant codes of a width dividing 32
("turboquant-mse-<1|2|4|8>"); others run on the reference. Tested on CPU in TPU interpret mode;
no TPU has run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.codecs import bitpack
from kernels_pallas.codecs.kv import CompressedPages, KvCompressor
from kernels_pallas.codecs.turboquant import TurboQuantCompressor
from kernels_pallas.kv_compress.rotated import rotated_queries, values_out
from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged
from kernels_pallas.paged_attention.tpu import (
    init_scratch,
    needed_pages,
    page_keep,
    page_live,
    softmax_update,
)


def kernel_supports(key: KvCompressor, value: KvCompressor) -> str | None:
    """None if the TPU kernel reads codes of these (key, value) compressors, else why not."""
    for c in (key, value):
        if not (isinstance(c, TurboQuantCompressor) and c.qjl_dim == 0 and c.mse_bits
                and bitpack.is_fields(c.mse_bits)):
            return (f"the TPU kernel reads MSE-stage TurboQuant codes of 1, 2, 4 or 8 bits "
                    f"(turboquant-mse-<b>), not {c.name}")
    if key.mse_bits != value.mse_bits or key.head_dim % (bitpack.GROUP // key.mse_bits):
        return "the TPU kernel needs keys and values of one width filling whole words"
    return None


def _grid_values(code: jax.Array, grid: np.ndarray) -> jax.Array:
    """grid[code] as a select chain (the vector units have no gather)."""
    y = jnp.full(code.shape, float(grid[0]), jnp.float32)
    for level in range(1, len(grid)):
        y = jnp.where(code == level, float(grid[level]), y)
    return y


def _kernel(layer_ref, q_lens_ref, seq_lens_ref, tables_ref, q_ref, bias_ref, k_norm_ref,
            k_words_ref, v_norm_ref, v_words_ref, o_ref, m_scratch, l_scratch, acc_scratch, *,
            sm_scale: float, soft_cap: float | None, sliding_window: int | None, group: int,
            bits: int, key_grid: np.ndarray, value_grid: np.ndarray):
    del layer_ref, tables_ref  # used by the index maps
    row, page = pl.program_id(0), pl.program_id(1)
    page_size, num_kv_heads, _ = k_words_ref.shape
    fields, rows = q_ref.shape[1], q_ref.shape[2]  # 32 / bits; Q * group
    q_len, seq_len = q_lens_ref[row], seq_lens_ref[row]
    first_q = seq_len - q_len
    page_start = page * page_size
    mask = (1 << bits) - 1

    pl.when(page == 0)(lambda: init_scratch(m_scratch, l_scratch, acc_scratch))

    @pl.when(page_live(page_start, page_size, seq_len, first_q, sliding_window))
    def _attend():
        keep = page_keep(rows, page_size, group, first_q, page_start, seq_len, sliding_window)
        precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

        def field(words, i, grid):
            return _grid_values((words >> (bits * i)) & mask, grid).astype(q_ref.dtype)

        for h in range(num_kv_heads):
            k_words, v_words = k_words_ref[:, h, :], v_words_ref[:, h, :]  # [page_size, W]
            s = jnp.zeros((rows, page_size), jnp.float32)
            for i in range(fields):
                s += lax.dot_general(q_ref[h, i], field(k_words, i, key_grid),
                                     (((1,), (1,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)
            k_norm = k_norm_ref[:, h].astype(jnp.float32)[None, :]
            s = (bias_ref[h] + k_norm * s) * sm_scale
            p, correction = softmax_update(s, keep, soft_cap, m_scratch.at[h], l_scratch.at[h])
            pv = (p * v_norm_ref[:, h].astype(jnp.float32)[None, :]).astype(q_ref.dtype)
            for i in range(fields):
                acc_scratch[h, i] = acc_scratch[h, i] * correction + jnp.dot(
                    pv, field(v_words, i, value_grid), precision=precision,
                    preferred_element_type=jnp.float32)

    @pl.when(page == pl.num_programs(1) - 1)
    def _finish():
        denom = l_scratch[...][:, None]  # [Hkv, 1, rows, 1]
        out = acc_scratch[...] / jnp.where(denom > 0, denom, 1.0)
        query = lax.broadcasted_iota(jnp.int32, out.shape, 2) // group
        o_ref[...] = jnp.where(query < q_len, out, 0.0)


def attend_rows(q: jax.Array, kv: CompressedPages, layer: jax.Array, q_lens: jax.Array,
                seq_lens: jax.Array, page_tables: jax.Array, *, sm_scale: float,
                sliding_window: int | None = None, soft_cap: float | None = None,
                interpret: bool = False) -> jax.Array:
    """Rows of up to Q query tokens, the last q_len of each row's context: q [R, Q, Hq, hd]
    -> value-domain outputs [R, Q, Hq, hd] float32, zeros past q_len."""
    num_rows, max_q_len, num_heads, head_dim = q.shape
    key, value = kv.key_compressor, kv.value_compressor
    bits = key.mse_bits
    fields = bitpack.GROUP // bits
    width = head_dim // fields  # words per vector
    num_kv_heads, page_size = kv.k["norm"].shape[3], kv.page_size
    group = num_heads // num_kv_heads
    pages_per_seq = page_tables.shape[1]
    rows = max_q_len * group
    q_rot, _, bias = rotated_queries(q, kv, layer)
    # [R, Q, Hkv, G, W, fields] -> [R, Hkv, fields, Q * G, W]: element w * fields + i of a
    # query sits at [i, w], next to the codes field i of word w unpacks to.
    q_rot = q_rot.reshape(num_rows, max_q_len, num_kv_heads, group, width, fields)
    q_rot = q_rot.transpose(0, 2, 5, 1, 3, 4).reshape(num_rows, num_kv_heads, fields, rows,
                                                      width)
    bias = bias.reshape(num_rows, max_q_len, num_kv_heads, group).transpose(0, 2, 1, 3)
    bias = bias.reshape(num_rows, num_kv_heads, rows, 1)

    def page_map(r, p, layer_ref, q_lens_ref, seq_lens_ref, tables_ref):
        seq_len = seq_lens_ref[r]
        needed = needed_pages(p, seq_len, seq_len - q_lens_ref[r], page_size, sliding_window)
        return layer_ref[0], tables_ref[r * pages_per_seq + needed], 0, 0

    def words_map(*args):
        return (*page_map(*args), 0)

    norm_spec = pl.BlockSpec((None, None, page_size, num_kv_heads), page_map)
    words_spec = pl.BlockSpec((None, None, page_size, num_kv_heads, width), words_map)
    q_spec = pl.BlockSpec((None, num_kv_heads, fields, rows, width),
                          lambda r, p, *_: (r, 0, 0, 0, 0))
    bias_spec = pl.BlockSpec((None, num_kv_heads, rows, 1), lambda r, p, *_: (r, 0, 0, 0))
    kernel = functools.partial(_kernel, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, group=group, bits=bits,
                               key_grid=np.asarray(key.grid), value_grid=np.asarray(value.grid))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_rows, pages_per_seq),
            in_specs=[q_spec, bias_spec, norm_spec, words_spec, norm_spec, words_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                            pltpu.VMEM((num_kv_heads, fields, rows, width), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_rot.shape, jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="compressed_attention_tpu",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), q_lens.astype(jnp.int32),
      seq_lens.astype(jnp.int32), page_tables.reshape(-1).astype(jnp.int32), q_rot,
      bias.astype(jnp.float32), kv.k["norm"], kv.k["mse"], kv.v["norm"], kv.v["mse"])
    # [R, Hkv, fields, Q * G, W] -> [R, Q, Hkv, G, W, fields] -> [R, Q, Hq, hd]
    out = out.reshape(num_rows, num_kv_heads, fields, max_q_len, group, width)
    out = out.transpose(0, 3, 1, 4, 5, 2).reshape(num_rows, max_q_len, num_heads, head_dim)
    valid = jnp.arange(max_q_len)[None, :] < q_lens[:, None]
    return jnp.where(valid[:, :, None, None], values_out(out, kv, layer), 0.0)


def ragged_paged_attention(q: jax.Array, kv: CompressedPages, layer: jax.Array,
                           rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           interpret: bool = False) -> jax.Array:
    """The step's attention [T, Hq, hd] over codes (contract: `reference.ragged_paged_attention`)."""
    reason = kernel_supports(kv.key_compressor, kv.value_compressor)
    if reason:
        raise ValueError(reason)

    def attend(row_q, row_q_lens, row_seq_lens, row_tables):
        return attend_rows(row_q, kv, layer, row_q_lens, row_seq_lens, row_tables,
                           sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                           interpret=interpret)

    out = attend_ragged(q, rows, attend_prefill=attend)
    return out.astype(q.dtype)
