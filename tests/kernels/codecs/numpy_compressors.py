"""Independent float64 numpy versions of the KV compressors' round trips (encode then decode),
written from the papers' formulas: nearest-centroid by argmin rather than cell edges, polar
form by explicit pairs, the QJL estimate by its defining sum. They take the transforms (the
rotation, the sketch, the grids) from the compressor under test: what they check is the
arithmetic built on them."""

from __future__ import annotations

import numpy as np


def nearest(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return grid[np.argmin(np.abs(values[..., None] - grid), axis=-1)]


def polarquant_round_trip(x: np.ndarray, rotation: np.ndarray, grids: list[np.ndarray]
                          ) -> np.ndarray:
    y = x @ rotation.T
    d = y.shape[-1]
    radii, angles = y, []
    for level, grid in enumerate(grids, start=1):
        pairs = radii.reshape(*radii.shape[:-1], -1, 2)
        angle = np.arctan2(pairs[..., 1], pairs[..., 0])
        if level == 1:  # circular: distance around the circle
            angle = np.mod(angle, 2 * np.pi)
            gap = np.abs(angle[..., None] - grid)
            angles.append(grid[np.argmin(np.minimum(gap, 2 * np.pi - gap), axis=-1)])
        else:
            angles.append(nearest(angle, grid))
        radii = np.sqrt(pairs[..., 0] ** 2 + pairs[..., 1] ** 2)
    radii = radii.astype(np.float16).astype(np.float64)  # the stored norm
    for angle in reversed(angles):
        radii = np.stack([radii * np.cos(angle), radii * np.sin(angle)], axis=-1)
        radii = radii.reshape(*radii.shape[:-2], -1)
    assert radii.shape[-1] == d
    return radii @ rotation


def qjl_estimate(q: np.ndarray, k: np.ndarray, sketch: np.ndarray) -> np.ndarray:
    """sqrt(pi/2)/m ||k|| <S q, sign(S k)> for q [Q, d], k [N, d]: [Q, N]."""
    m = sketch.shape[0]
    norm = np.linalg.norm(k, axis=-1).astype(np.float16).astype(np.float64)
    signs = np.where(k @ sketch.T >= 0, 1.0, -1.0)
    return np.sqrt(np.pi / 2) / m * (q @ sketch.T) @ signs.T * norm[None, :]


def turboquant_round_trip(x: np.ndarray, rotation: np.ndarray, grid: np.ndarray | None,
                          sketch: np.ndarray | None) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    y = (x / norm) @ rotation.T
    y_hat = nearest(y, grid) if grid is not None else np.zeros_like(y)
    if sketch is not None:
        residual = y - y_hat
        gamma = np.linalg.norm(residual, axis=-1, keepdims=True)
        gamma = gamma.astype(np.float16).astype(np.float64)
        signs = np.where(residual @ sketch.T >= 0, 1.0, -1.0)
        y_hat = y_hat + np.sqrt(np.pi / 2) / sketch.shape[0] * gamma * (signs @ sketch)
    return norm.astype(np.float16).astype(np.float64) * (y_hat @ rotation)
