"""Fixed quantization grids and seeded random transforms shared by the KV compressors.

After a random rotation, a vector's coordinates (and the angles of its polar form) follow
distributions known in closed form, so each can be quantized on a grid computed once from
that distribution (Lloyd-Max: each centroid the mean of its cell, cell edges halfway between
centroids) with no per-block scale or zero point. Grids are computed in float64 numpy,
deterministically, and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def lloyd_max(density: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, levels: int,
              *, grid: int = 1 << 16, iters: int = 500) -> np.ndarray:
    """Centroids (ascending) of the `levels`-point quantizer minimising mean squared error
    for `density` (unnormalised, symmetric about the middle of [lo, hi]) on a fine grid of the
    interval. The grid is kept mirror-symmetric at every iteration, as the optimum is: on a
    discrete grid an asymmetric start can otherwise stall a point away from it."""
    x = lo + (np.arange(grid) + 0.5) * (hi - lo) / grid
    w = density(x)
    w = w / w.sum()
    # Start at the high-resolution optimum (centroid density ~ density^(1/3), Panter-Dite):
    # fine grids then need few iterations.
    companded = np.cumsum(np.cbrt(w))
    centroids = np.interp((np.arange(levels) + 0.5) / levels, companded / companded[-1], x)

    def mirrored(c):
        return (c + (lo + hi - c[::-1])) / 2

    centroids = mirrored(centroids)
    for _ in range(iters):
        cell = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x)
        mass = np.bincount(cell, w, levels)
        new = np.where(mass > 0, np.bincount(cell, w * x, levels) / np.maximum(mass, 1e-300),
                       centroids)
        new = mirrored(new)
        done = np.max(np.abs(new - centroids)) < 1e-10 * (hi - lo)
        centroids = new
        if done:
            break
    return centroids


def edges(centroids: np.ndarray) -> np.ndarray:
    """Cell boundaries of a nearest-centroid quantizer (a value's code: how many it exceeds)."""
    return (centroids[1:] + centroids[:-1]) / 2


@functools.cache
def sphere_coordinate_grid(dim: int, bits: int) -> np.ndarray:
    """Lloyd-Max centroids for one coordinate of a uniformly random unit vector in R^dim,
    whose density is proportional to (1 - x^2)^((dim - 3) / 2) on [-1, 1] (close to
    N(0, 1/dim) for large dim). The TurboQuant MSE stage's grid."""
    def density(x):
        return np.exp((dim - 3) / 2 * np.log1p(-x * x))
    reach = min(1.0, 16 / np.sqrt(dim))  # 16 standard deviations: all the mass that counts
    return lloyd_max(density, -reach, reach, 2 ** bits)


@functools.cache
def polar_angle_grid(level: int, bits: int) -> np.ndarray:
    """Centroids for the angles of PolarQuant's level `level` (1 = pairs of coordinates).

    Level 1 angles of a randomly rotated vector are uniform on [0, 2pi): a uniform grid of cell
    centres. At level l >= 2 an angle is atan(|b| / |a|) of two sub-vectors of 2^(l-1) Gaussian
    coordinates each, with density proportional to sin(2 psi)^(2^(l-1) - 1) on [0, pi/2]."""
    if level == 1:
        return (np.arange(2 ** bits) + 0.5) * 2 * np.pi / 2 ** bits
    power = 2 ** (level - 1) - 1
    return lloyd_max(lambda x: np.sin(2 * x) ** power, 0.0, np.pi / 2, 2 ** bits)


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix [dim, dim] (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))[None, :]


def gaussian_sketch(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """A [rows, dim] matrix of independent N(0, 1) entries (QJL's projection)."""
    return rng.standard_normal((rows, dim))


def seeded(seed: int) -> np.random.Generator:
    """The generator every compressor draws its transforms from (PCG64: same on every
    platform and numpy version)."""
    return np.random.Generator(np.random.PCG64(seed))


def quantize(values: jax.Array, centroids: np.ndarray) -> jax.Array:
    """int32 codes of the nearest centroids.

    Compares against every edge (at most 255) rather than bisecting: one fused elementwise
    pass, where the default bisection is a loop that costs a GPU step a device-to-host
    round trip per iteration, per layer."""
    return jnp.searchsorted(jnp.asarray(edges(centroids), jnp.float32), values,
                            method="compare_all").astype(jnp.int32)


def check_head_dim(head_dim: int, *, power_of_two: bool = False) -> None:
    if head_dim < 2 or (power_of_two and head_dim & (head_dim - 1)):
        need = "a power of two" if power_of_two else "at least 2"
        raise ValueError(f"head_dim must be {need}, got {head_dim}")
