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
import numpy as np

from dendrite_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, N, page_size, Hkv, hd]
    v: jax.Array  # [L, N, page_size, Hkv, hd]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: str) -> KVCache:
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

    def copied(self, src: jax.Array, dst: jax.Array) -> KVCache:
        """Pages src[i] copied to dst[i] in every layer."""
        return KVCache(k=self.k.at[:, dst].set(self.k[:, src]),
                       v=self.v.at[:, dst].set(self.v[:, src]))

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: str) -> int:
        return 2 * cfg.num_layers * page_size * cfg.kv_size * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token of a step lives (layout: see `engine.step_plan`).

    Uploaded per row: `q_lens` [S] (query tokens), `seq_lens` [S] (context length after this
    step, new tokens included), `page_tables` [S, P]. Derived once per step on device:
    `positions`, `token_seq`, `valid` and where each new K/V is written (`slot_pages`,
    `slot_offsets`; padding tokens get page `num_pages`, out of range, and write nowhere).
    """

    q_lens: jax.Array
    seq_lens: jax.Array
    page_tables: jax.Array
    positions: jax.Array  # [T]
    token_seq: jax.Array  # [T]
    valid: jax.Array  # [T] bool
    slot_pages: jax.Array  # [T]
    slot_offsets: jax.Array  # [T]

    @classmethod
    def build(cls, q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
              num_decode: int, max_q_len: int, page_size: int,
              num_pages: int) -> AttentionMetadata:
        num_prefill = page_tables.shape[0] - num_decode
        token_seq = np.concatenate([np.arange(num_decode),
                                    num_decode + np.repeat(np.arange(num_prefill), max_q_len)])
        token_index = np.concatenate([np.zeros(num_decode, np.int32),
                                      np.tile(np.arange(max_q_len), num_prefill)])
        token_seq, token_index = jnp.asarray(token_seq, jnp.int32), jnp.asarray(token_index)
        valid = token_index < q_lens[token_seq]
        positions = jnp.where(valid, (seq_lens - q_lens)[token_seq] + token_index, 0)
        page = page_tables[token_seq, positions // page_size]
        return cls(q_lens=q_lens, seq_lens=seq_lens, page_tables=page_tables,
                   positions=positions, token_seq=token_seq, valid=valid,
                   slot_pages=jnp.where(valid, page, num_pages),
                   slot_offsets=positions % page_size)


@functools.partial(jax.jit, donate_argnums=0)
def copy_pages(kv, src: jax.Array, dst: jax.Array):
    """Copy whole pages src[i] -> dst[i] in every layer (the device half of copy-on-write),
    of a plain or a compressed cache."""
    return kv.copied(src, dst)
