"""PolarQuant (arXiv 2502.02617): a randomly rotated vector in polar form, angles on fixed grids.

Encoding rotates x by a seeded random orthogonal matrix, then takes polar coordinates
recursively: level 1 pairs coordinates (y[2i], y[2i+1]) into a radius and an angle in
[0, 2pi); each further level pairs the previous level's radii into a radius and an angle in
[0, pi/2], until one radius, the vector's norm, remains. After the rotation every angle's
distribution is known in closed form (`codebooks.polar_angle_grid`), so each level's angles
are quantized on one fixed grid: no per-block scale or zero point. Stored per vector: head_dim - 1
angle codes of `bits` bits (packed, padded to a multiple of 32) and the norm as float16.
Decoding rebuilds the radii from the norm down and rotates back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.codecs import bitpack, codebooks

BITS = (2, 4, 8)


class PolarQuantCompressor:
    def __init__(self, head_dim: int, bits: int = 4, seed: int = 0) -> None:
        codebooks.check_head_dim(head_dim, power_of_two=True)
        if bits not in BITS:
            raise ValueError(f"PolarQuant bits must be one of {BITS}, got {bits}")
        self.head_dim, self.bits, self.seed = head_dim, bits, seed
        self.name = f"polarquant-{bits}"
        self.levels = head_dim.bit_length() - 1
        self.rotation = codebooks.random_rotation(head_dim, codebooks.seeded(seed))
        self.grids = [codebooks.polar_angle_grid(level, bits)
                      for level in range(1, self.levels + 1)]
        self.num_angles = head_dim - 1  # d/2 + d/4 + ... + 1

    def encode(self, x: jax.Array) -> dict[str, jax.Array]:
        y = x.astype(jnp.float32) @ jnp.asarray(self.rotation.T, jnp.float32)
        radii, codes = y, []
        for level, grid in enumerate(self.grids, start=1):
            a, b = radii[..., 0::2], radii[..., 1::2]
            angle = jnp.arctan2(b, a)
            if level == 1:  # [0, 2pi), a uniform grid of 2^bits cells
                cells = 2 ** self.bits
                turns = jnp.mod(angle, 2 * np.pi) * (cells / (2 * np.pi))
                codes.append(jnp.minimum(turns.astype(jnp.int32), cells - 1))
            else:  # [0, pi/2]: radii are non-negative
                codes.append(codebooks.quantize(angle, grid))
            radii = jnp.hypot(a, b)
        return {"angles": bitpack.pack(jnp.concatenate(codes, axis=-1), self.bits),
                "norm": radii[..., 0].astype(jnp.float16)}

    def decode(self, codes: dict[str, jax.Array]) -> jax.Array:
        angles = bitpack.unpack(codes["angles"], self.bits, self.num_angles)
        radii = codes["norm"].astype(jnp.float32)[..., None]
        end = self.num_angles
        for level in range(self.levels, 0, -1):
            count = self.head_dim >> level
            grid = jnp.asarray(self.grids[level - 1], jnp.float32)
            angle = grid[angles[..., end - count:end]]
            end -= count
            radii = jnp.stack([radii * jnp.cos(angle), radii * jnp.sin(angle)], axis=-1)
            radii = radii.reshape(*radii.shape[:-2], 2 * count)
        return radii @ jnp.asarray(self.rotation, jnp.float32)

    def scores(self, q: jax.Array, codes: dict[str, jax.Array]) -> jax.Array:
        return q.astype(jnp.float32) @ self.decode(codes).T

    def bits_per_element(self) -> float:
        return bitpack.bits_per_element(self.encode, self.head_dim)
