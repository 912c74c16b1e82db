"""KV compression: one interface for encoding blocks of key or value vectors into codes.

A `KvCompressor` turns vectors `[..., head_dim]` into a codes pytree (arrays sharing the
leading axes, so pages of codes are laid out like pages of vectors) and back. Its storage cost
is measured, not declared: `bits_per_element` is the bytes of every code array (norms and
scales included, packing waste included) per vector, over head_dim.

Compressors (each seeded: the same seed gives the same codes on every platform):

- `IdentityCompressor`: the vectors as they are (the baseline).
- `PolarQuantCompressor(bits, seed)` (`polarquant.py`): random rotation, recursive polar
  form, angles on fixed grids, one norm per vector (arXiv 2502.02617).
- `QjlCompressor(dim, seed)` (`qjl.py`): sign bits of a Gaussian projection plus the norm;
  unbiased inner products with a full-precision query (arXiv 2406.03482).
- `TurboQuantCompressor(bits, qjl_dim, seed)` (`turboquant.py`): a (bits - 1)-bit
  rotated Lloyd-Max stage plus a QJL sketch of its residual: unbiased inner products
  (arXiv 2504.19874).

`make_compressor("turboquant-4", head_dim)` builds one by name (the names `KV_COMPRESSIONS`
lists); `make_kv_compression` the pair a compressed cache uses for keys and values.
`CompressedPages` is what the `kernels_pallas.kv_compress` kernels read of such a cache
(`dendrite_jax.cache.compressed_kv.CompressedKVCache`).
"""

from __future__ import annotations

import re
from typing import Protocol

import jax
import jax.numpy as jnp

from kernels_pallas.codecs import bitpack
from kernels_pallas.codecs.polarquant import PolarQuantCompressor
from kernels_pallas.codecs.qjl import QjlCompressor
from kernels_pallas.codecs.turboquant import TurboQuantCompressor

Codes = dict[str, jax.Array]


class KvCompressor(Protocol):
    name: str
    head_dim: int

    def encode(self, x: jax.Array) -> Codes:
        """Vectors [..., head_dim] -> codes with the same leading axes."""

    def decode(self, codes: Codes) -> jax.Array:
        """Codes -> float32 vectors [..., head_dim] (the estimate inner products use)."""

    def scores(self, q: jax.Array, codes: Codes) -> jax.Array:
        """Inner products [Q, N] of full-precision queries q [Q, head_dim] with the N encoded
        keys (codes with leading axis [N]); equal to q @ decode(codes).T."""

    def bits_per_element(self) -> float:
        """Exact stored bits per element: every code array of one vector (norms, scales and
        packing padding included), over head_dim (`bitpack.bits_per_element`)."""


class CompressedPages(Protocol):
    """Pages of key and value codes (each code array [L, N, page_size, Hkv, ...]), the
    per-(layer, KV head) means [L, Hkv, hd] subtracted before encoding, and the compressors.
    Read-only (a frozen dataclass): the kernels return it with new codes by
    `dataclasses.replace`."""

    @property
    def k(self) -> Codes: ...

    @property
    def v(self) -> Codes: ...

    @property
    def k_mean(self) -> jax.Array: ...

    @property
    def v_mean(self) -> jax.Array: ...

    @property
    def key_compressor(self) -> KvCompressor: ...

    @property
    def value_compressor(self) -> KvCompressor: ...

    @property
    def num_pages(self) -> int: ...

    @property
    def page_size(self) -> int: ...


def compression_ratio(compressor: KvCompressor, baseline_bits: int = 16) -> float:
    """How many times smaller than `baseline_bits` (bfloat16) per element."""
    return baseline_bits / compressor.bits_per_element()


class IdentityCompressor:
    """No compression: the vectors in `dtype` (bfloat16 by default)."""

    def __init__(self, head_dim: int, dtype: str = "bfloat16") -> None:
        self.head_dim = head_dim
        self.dtype = jnp.dtype(dtype)
        self.name = "none"

    def encode(self, x: jax.Array) -> Codes:
        return {"x": x.astype(self.dtype)}

    def decode(self, codes: Codes) -> jax.Array:
        return codes["x"].astype(jnp.float32)

    def scores(self, q: jax.Array, codes: Codes) -> jax.Array:
        return q.astype(jnp.float32) @ self.decode(codes).T

    def bits_per_element(self) -> float:
        return bitpack.bits_per_element(self.encode, self.head_dim)


KV_COMPRESSIONS = ("none", "fp8 (pages of E4M3 values)", "polarquant-<2|4|8>", "qjl-<dim>",
                   "turboquant-<bits>",
                   "turboquant-mse-<bits> (caches only)")


def make_compressor(name: str, head_dim: int, seed: int = 0) -> KvCompressor:
    """A compressor by name: "none", "polarquant-4", "qjl-256", "turboquant-4" (its QJL sketch
    has head_dim / 2 rows)."""
    if name == "none":
        return IdentityCompressor(head_dim)
    m = re.fullmatch(r"(polarquant|qjl|turboquant)-(\d+)", name)
    if m is None:
        raise ValueError(f"unknown KV compression {name!r}; choose from {KV_COMPRESSIONS}")
    kind, n = m.group(1), int(m.group(2))
    if kind == "polarquant":
        return PolarQuantCompressor(head_dim, bits=n, seed=seed)
    if kind == "qjl":
        return QjlCompressor(head_dim, dim=n, seed=seed)
    return TurboQuantCompressor(head_dim, bits=n, qjl_dim=head_dim // 2, seed=seed)


def make_kv_compression(name: str, head_dim: int, seed: int = 0
                        ) -> tuple[KvCompressor, KvCompressor]:
    """(key compressor, value compressor) for a cache compression name.

    Keys need inner products with queries, values a low squared error (they are averaged by
    the attention weights), so: "turboquant-<b>" stores keys as TurboQuant at b bits (a
    (b-1)-bit MSE stage + a head_dim/2-bit QJL sketch: unbiased scores) and values as its
    b-bit MSE stage; "turboquant-mse-<b>" both as the b-bit MSE stage (lower variance,
    slightly shrunk scores); "polarquant-<b>" both as PolarQuant; "qjl-<m>" keys as an m-bit QJL
    sketch and values in bfloat16, as in the QJL paper; "none" both in bfloat16.
    """
    if name == "none":
        return IdentityCompressor(head_dim), IdentityCompressor(head_dim)
    mse = re.fullmatch(r"turboquant-mse-(\d+)", name)
    if mse:
        bits = int(mse.group(1))
        return (TurboQuantCompressor(head_dim, bits=bits, qjl_dim=0, seed=seed),
                TurboQuantCompressor(head_dim, bits=bits, qjl_dim=0, seed=seed + 1))
    key = make_compressor(name, head_dim, seed)
    if isinstance(key, TurboQuantCompressor):
        return key, TurboQuantCompressor(head_dim, bits=key.bits, qjl_dim=0, seed=seed + 1)
    if isinstance(key, QjlCompressor):
        return key, IdentityCompressor(head_dim)
    return key, make_compressor(name, head_dim, seed + 1)


__all__ = ["KV_COMPRESSIONS", "Codes", "CompressedPages", "IdentityCompressor", "KvCompressor",
           "PolarQuantCompressor", "QjlCompressor", "TurboQuantCompressor",
           "compression_ratio", "make_compressor", "make_kv_compression"]
