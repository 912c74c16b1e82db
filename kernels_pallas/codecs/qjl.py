"""QJL (arXiv 2406.03482): a 1-bit Johnson-Lindenstrauss sketch with an unbiased estimator.

A key k is stored as sign(S k) (`dim` bits) and its norm (float16), for S a seeded [dim,
head_dim] matrix of N(0, 1) entries. The query stays in full precision, and
    <q, k>  ~  sqrt(pi/2) / dim * ||k|| * <S q, sign(S k)>
is unbiased over S, with variance at most pi/(2 dim) ||q||^2 ||k||^2. `decode` returns the
vector this estimator pairs q with, sqrt(pi/2) / dim * ||k|| * S^T sign(S k) (unbiased too),
so attention can use codes through either path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.codecs import bitpack, codebooks


class QjlCompressor:
    def __init__(self, head_dim: int, dim: int = 256, seed: int = 0) -> None:
        codebooks.check_head_dim(head_dim)
        if dim < 1:
            raise ValueError(f"QJL sketch dim must be positive, got {dim}")
        self.head_dim, self.dim, self.seed = head_dim, dim, seed
        self.name = f"qjl-{dim}"
        self.sketch = codebooks.gaussian_sketch(dim, head_dim, codebooks.seeded(seed))

    def encode(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(jnp.float32)
        signs = (x @ jnp.asarray(self.sketch.T, jnp.float32)) >= 0
        return {"signs": bitpack.pack(signs, 1),
                "norm": jnp.linalg.norm(x, axis=-1).astype(jnp.float16)}

    def _signs(self, codes: dict[str, jax.Array]) -> jax.Array:
        return 2.0 * bitpack.unpack(codes["signs"], 1, self.dim).astype(jnp.float32) - 1.0

    def _scale(self, codes: dict[str, jax.Array]) -> jax.Array:
        return np.sqrt(np.pi / 2) / self.dim * codes["norm"].astype(jnp.float32)

    def decode(self, codes: dict[str, jax.Array]) -> jax.Array:
        return (self._scale(codes)[..., None]
                * (self._signs(codes) @ jnp.asarray(self.sketch, jnp.float32)))

    def scores(self, q: jax.Array, codes: dict[str, jax.Array]) -> jax.Array:
        projected = q.astype(jnp.float32) @ jnp.asarray(self.sketch.T, jnp.float32)  # [Q, dim]
        return (projected @ self._signs(codes).T) * self._scale(codes)[None, :]

    def bits_per_element(self) -> float:
        return bitpack.bits_per_element(self.encode, self.head_dim)
