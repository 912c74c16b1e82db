"""The paged KV cache pytree and the per-step attention metadata pytree.

Layout: keys and values are each `[num_layers, num_pages, page_size, num_kv_heads, head_dim]`.
All layers live in one array, donated to each step and updated in place by the step's K/V
writes (`kernels_pallas.paged_attention.write_and_attend`); attention reads only the pages a
sequence owns.
One page holds `page_size` consecutive positions of one sequence for every layer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dendrite_jax.config import ModelConfig
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE, Fp8Calibration
from kernels_pallas.paged_attention.ragged import RaggedRows, ragged_rows
from kernels_pallas.paged_attention.tail import FullPrecisionTail, TailTokens

# kv_compression values whose pages hold vectors (this cache), not codes (`compressed_kv`)
PLAIN_KV = ("none", "fp8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, N, page_size, Hkv, hd]
    v: jax.Array  # [L, N, page_size, Hkv, hd]
    # FP8 pages (`kernels_pallas.paged_attention.fp8`): each (layer, KV head)'s mean and scale
    fp8: Fp8Calibration | None = None
    # FP8 pages' full-precision sink and recent tokens per slot (`paged_attention.tail`)
    tail: FullPrecisionTail | None = None

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: str,
               fp8: Fp8Calibration | None = None,
               tail: FullPrecisionTail | None = None) -> KVCache:
        """An empty cache of `dtype` pages; FP8 pages need their calibration (means and
        scales per (layer, KV head): `model.calibration.kv_fp8_calibration`) and may have a
        full-precision tail."""
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        if (jnp.dtype(dtype) == FP8_DTYPE) != (fp8 is not None):
            raise ValueError("FP8 pages need their calibration, and only they take one")
        if tail is not None and fp8 is None:
            raise ValueError("a full-precision tail is for FP8 pages")
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), fp8=fp8, tail=tail)

    def copied(self, src: jax.Array, dst: jax.Array) -> KVCache:
        """Pages src[i] copied to dst[i] in every layer."""
        return dataclasses.replace(self, k=self.k.at[:, dst].set(self.k[:, src]),
                                   v=self.v.at[:, dst].set(self.v[:, src]))

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: str) -> int:
        return 2 * cfg.num_layers * page_size * cfg.kv_size * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step lives (layout: `kernels_pallas.paged_attention.ragged`).

    Derived once per step on device from the uploaded per-sequence arrays: the attention rows
    (`rows`), each token's sequence (`token_seq`; padding tokens: any row, `valid` False) and
    its sequence's slot (`token_slots`; each row's: `row_slots`), `positions`, `valid`, and
    where each new K/V is written (`slot_pages`, `slot_offsets`; padding tokens get page
    `num_pages`, out of range, and write nowhere).
    """

    rows: RaggedRows
    positions: jax.Array  # [T]
    token_seq: jax.Array  # [T]
    valid: jax.Array  # [T] bool
    slot_pages: jax.Array  # [T]
    slot_offsets: jax.Array  # [T]
    token_slots: jax.Array  # [T]
    row_slots: jax.Array  # [R]

    @classmethod
    def build(cls, q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
              num_tokens: int, decode_only: bool, page_size: int, num_pages: int,
              slot_ids: jax.Array | None = None) -> AttentionMetadata:
        """`slot_ids` [R]: each row's slot (default: row r is slot r)."""
        rows = ragged_rows(q_lens, seq_lens, page_tables, num_tokens=num_tokens,
                           decode_only=decode_only)
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        num_rows = rows.num_rows
        if decode_only:  # token r is row r's
            token_seq, valid = t, rows.q_lens > 0
        else:
            token_seq = jnp.searchsorted(jnp.cumsum(rows.q_lens), t, side="right")
            valid = token_seq < num_rows
        seq = jnp.minimum(token_seq, num_rows - 1)
        # A token's index within its row (a decode-only step's token is its row's only one).
        starts = jnp.cumsum(rows.q_lens) - rows.q_lens
        offset = jnp.zeros_like(t) if decode_only else t - starts[seq]
        positions = jnp.where(valid, rows.seq_lens[seq] - rows.q_lens[seq] + offset, 0)
        page = rows.page_tables[seq, positions // page_size]
        row_slots = (jnp.arange(num_rows, dtype=jnp.int32) if slot_ids is None
                     else jnp.asarray(slot_ids, jnp.int32))
        return cls(rows=rows, positions=positions, token_seq=seq, valid=valid,
                   slot_pages=jnp.where(valid, page, num_pages),
                   slot_offsets=positions % page_size, token_slots=row_slots[seq],
                   row_slots=row_slots)

    def tail_tokens(self) -> TailTokens:
        """Where the step's tokens sit in a full-precision tail (`paged_attention.tail`)."""
        q_lens, seq_lens = self.rows.q_lens, self.rows.seq_lens
        # a decode-only step's token r is row r's, whatever rows without a token lie between
        offsets = (jnp.arange(q_lens.shape[0], dtype=jnp.int32) if self.rows.decode_only
                   else jnp.cumsum(q_lens) - q_lens)
        return TailTokens(rows=self.token_seq, positions=self.positions, valid=self.valid,
                          slots=self.row_slots, starts=seq_lens - q_lens, ends=seq_lens,
                          offsets=offsets)


@functools.partial(jax.jit, donate_argnums=0)
def copy_pages(kv, src: jax.Array, dst: jax.Array):
    """Copy whole pages src[i] -> dst[i] in every layer (the device half of copy-on-write),
    of a plain or a compressed cache."""
    return kv.copied(src, dst)
