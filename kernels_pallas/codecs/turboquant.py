"""TurboQuant (arXiv 2504.19874): rotated Lloyd-Max quantization plus a QJL sketch of the
residual, for inner products that are unbiased at a few bits per element.

A vector x is stored as its norm (float16) and the unit vector u = x / ||x|| rotated by a
seeded random orthogonal matrix, y = R u, whose coordinates all follow one known
distribution: each is quantized to `bits - 1` bits on that distribution's Lloyd-Max grid
(`codebooks.sphere_coordinate_grid`; the MSE stage). The residual r = y - y_hat keeps its
norm (float16) and a `qjl_dim`-bit sign sketch sign(S r) (the QJL stage), so
    x_hat = ||x|| R^T (y_hat + sqrt(pi/2) / qjl_dim * ||r|| S^T sign(S r))
has E[<q, x_hat>] = <q, x> over S. With `qjl_dim=0` it is the MSE stage alone, at `bits`
bits (TurboQuant_mse).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.codecs import bitpack, codebooks


class TurboQuantCompressor:
    def __init__(self, head_dim: int, bits: int = 4, qjl_dim: int = 64, seed: int = 0) -> None:
        codebooks.check_head_dim(head_dim)
        if qjl_dim < 0:
            raise ValueError(f"qjl_dim must be >= 0, got {qjl_dim}")
        self.mse_bits = bits - 1 if qjl_dim else bits
        if not 1 <= bits <= 9 or self.mse_bits > 8:
            raise ValueError(f"TurboQuant bits must be in 1..8 (1..9 with a QJL stage), "
                             f"got {bits}")
        self.head_dim, self.bits, self.qjl_dim, self.seed = head_dim, bits, qjl_dim, seed
        self.name = f"turboquant-{bits}" + (f"-qjl{qjl_dim}" if qjl_dim else "-mse")
        rng = codebooks.seeded(seed)
        self.rotation = codebooks.random_rotation(head_dim, rng)
        self.sketch = codebooks.gaussian_sketch(qjl_dim, head_dim, rng) if qjl_dim else None
        self.grid = (codebooks.sphere_coordinate_grid(head_dim, self.mse_bits)
                     if self.mse_bits else np.zeros(1))

    def _rotated(self, codes: dict[str, jax.Array]) -> jax.Array:
        """The unit vector's rotated estimate: y_hat (+ the residual's QJL estimate)."""
        y = jnp.zeros((*codes["norm"].shape, self.head_dim), jnp.float32)
        if self.mse_bits:
            y = jnp.asarray(self.grid, jnp.float32)[
                bitpack.unpack(codes["mse"], self.mse_bits, self.head_dim)]
        if self.qjl_dim:
            signs = 2.0 * bitpack.unpack(codes["signs"], 1, self.qjl_dim).astype(jnp.float32) - 1
            scale = np.sqrt(np.pi / 2) / self.qjl_dim * codes["residual_norm"].astype(jnp.float32)
            y = y + scale[..., None] * (signs @ jnp.asarray(self.sketch, jnp.float32))
        return y

    def encode(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(jnp.float32)
        norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
        y = (x / jnp.where(norm > 0, norm, 1.0)) @ jnp.asarray(self.rotation.T, jnp.float32)
        codes = {"norm": norm[..., 0].astype(jnp.float16)}
        residual = y
        if self.mse_bits:
            mse = codebooks.quantize(y, self.grid)
            codes["mse"] = bitpack.pack(mse, self.mse_bits)
            residual = y - jnp.asarray(self.grid, jnp.float32)[mse]
        if self.qjl_dim:
            signs = (residual @ jnp.asarray(self.sketch.T, jnp.float32)) >= 0
            codes["signs"] = bitpack.pack(signs, 1)
            codes["residual_norm"] = jnp.linalg.norm(residual, axis=-1).astype(jnp.float16)
        return codes

    def decode(self, codes: dict[str, jax.Array]) -> jax.Array:
        return (codes["norm"].astype(jnp.float32)[..., None]
                * (self._rotated(codes) @ jnp.asarray(self.rotation, jnp.float32)))

    def scores(self, q: jax.Array, codes: dict[str, jax.Array]) -> jax.Array:
        """Rotates the queries once instead of every key back."""
        rotated_q = q.astype(jnp.float32) @ jnp.asarray(self.rotation.T, jnp.float32)
        return (rotated_q @ self._rotated(codes).T) * codes["norm"].astype(jnp.float32)[None, :]

    def bits_per_element(self) -> float:
        return bitpack.bits_per_element(self.encode, self.head_dim)
