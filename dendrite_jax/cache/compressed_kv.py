"""The compressed paged KV cache: pages hold codes, not vectors.

`CompressedKVCache` has the plain cache's page layout and step interface (created once,
donated to every step, pages copied on write), but each page holds its keys' and values'
codes (`kernels_pallas.codecs.kv`): every code array is `[L, N, page_size, Hkv, ...]`, so page ids,
page tables, prefix caching, preemption and beam forking work unchanged. A step encodes its new
keys/values as it writes them, and attention decodes only the pages a row reads
(`kernels_pallas.kv_compress`, which reads the cache as a `codecs.kv.CompressedPages`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dendrite_jax.cache.kv import KVCache
from dendrite_jax.config import ModelConfig
from kernels_pallas.codecs.kv import Codes, KvCompressor, make_kv_compression
from kernels_pallas.paged_attention.tail import FullPrecisionTail


@dataclasses.dataclass(frozen=True)
class CompressedKVCache:
    k: Codes  # each [L, N, page_size, Hkv, ...]: codes of key - k_mean[layer]
    v: Codes  # codes of value - v_mean[layer]
    k_mean: jax.Array  # [L, Hkv, hd] float32 (`model.calibration`; zeros: no centering)
    v_mean: jax.Array
    key_compressor: KvCompressor  # static: part of the compiled step's identity
    value_compressor: KvCompressor
    # the full-precision sink and recent tokens per slot (`paged_attention.tail`)
    tail: FullPrecisionTail | None = None

    def copied(self, src: jax.Array, dst: jax.Array) -> CompressedKVCache:
        """Pages src[i] copied to dst[i] in every layer (every code array)."""
        def copy(codes: Codes) -> Codes:
            return {name: a.at[:, dst].set(a[:, src]) for name, a in codes.items()}
        return dataclasses.replace(self, k=copy(self.k), v=copy(self.v))

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
               seed: int = 0, means: tuple[jax.Array, jax.Array] | None = None,
               tail: FullPrecisionTail | None = None) -> CompressedKVCache:
        """An empty cache; `means` (mean key, mean value [L, Hkv, hd]) centre what is
        encoded; `tail`: a full-precision tail beside the codes."""
        key, value = make_kv_compression(compression, cfg.head_dim, seed)
        if means is None:  # two arrays: the step donates each
            means = tuple(jnp.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim),
                                    jnp.float32) for _ in range(2))
        shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)

        def zeros(compressor: KvCompressor) -> Codes:
            specs = jax.eval_shape(compressor.encode, jax.ShapeDtypeStruct(shape, jnp.float32))
            return {name: jnp.zeros(s.shape, s.dtype) for name, s in specs.items()}

        return cls(k=zeros(key), v=zeros(value), k_mean=jnp.asarray(means[0], jnp.float32),
                   v_mean=jnp.asarray(means[1], jnp.float32), key_compressor=key,
                   value_compressor=value, tail=tail)

    @staticmethod
    def bytes_per_page(cfg: ModelConfig, page_size: int, compression: str) -> int:
        """Bytes of one page in every layer, code arrays (norms included) of keys and values."""
        bits = sum(c.bits_per_element() for c in make_kv_compression(compression, cfg.head_dim))
        return round(cfg.num_layers * page_size * cfg.kv_size * bits) // 8


jax.tree_util.register_dataclass(CompressedKVCache,
                                 data_fields=["k", "v", "k_mean", "v_mean", "tail"],
                                 meta_fields=["key_compressor", "value_compressor"])

PagedCache = KVCache | CompressedKVCache  # what a step reads and writes
