"""The compressed paged KV cache: pages hold codes, not vectors.

`CompressedKVCache` has the plain cache's page layout and step interface (created once,
donated to every step, pages copied on write), but each page holds its keys' and values'
codes (`cache.compress`): every code array is `[L, N, page_size, Hkv, ...]`, so page ids,
page tables, prefix caching, preemption and beam forking work unchanged. A step encodes its new
keys/values as it writes them, and attention decodes only the pages a row reads
(`kernels_pallas.kv_compress`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dendrite_jax.cache.compress import Codes, KvCompressor, make_kv_compression
from dendrite_jax.cache.kv import KVCache
from dendrite_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CompressedKVCache:
    k: Codes  # each [L, N, page_size, Hkv, ...]
    v: Codes
    key_compressor: KvCompressor  # static: part of the compiled step's identity
    value_compressor: KvCompressor

    @property
    def _leaf(self) -> jax.Array:
        return next(iter(self.k.values()))

    @property
    def num_pages(self) -> int:
        return self._leaf.shape[1]

    @property
    def page_size(self) -> int:
        return self._leaf.shape[2]

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, compression: str,
               seed: int = 0) -> CompressedKVCache:
        key, value = make_kv_compression(compression, cfg.head_dim, seed)
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)

        def zeros(compressor: KvCompressor) -> Codes:
            specs = jax.eval_shape(compressor.encode, jax.ShapeDtypeStruct(shape, jnp.float32))
            return {name: jnp.zeros(s.shape, s.dtype) for name, s in specs.items()}

        return cls(k=zeros(key), v=zeros(value), key_compressor=key, value_compressor=value)

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, compression: str) -> int:
        """Bytes of one page in every layer, code arrays (norms included) of keys and values."""
        total = 0
        for compressor in make_kv_compression(compression, cfg.head_dim):
            specs = jax.eval_shape(compressor.encode,
                                   jax.ShapeDtypeStruct((cfg.num_kv_heads, cfg.head_dim),
                                                        jnp.float32))
            total += sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(specs))
        return cfg.num_layers * page_size * total


jax.tree_util.register_dataclass(CompressedKVCache, data_fields=["k", "v"],
                                 meta_fields=["key_compressor", "value_compressor"])

PagedCache = KVCache | CompressedKVCache  # what a step reads and writes
