"""The FP8 weight format (`kernels_pallas.codecs.fp8`): MXFP8 and per-channel quantization
against an independent numpy (ml_dtypes) implementation, their error bounds, and bad schemes
and shapes refused."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels_pallas.codecs.fp8 import dequantize, quantize


def numpy_mxfp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference MXFP8 of w [K, N] (float64 arithmetic): per block of 32 along K, the smallest
    power of two 2^e with max|block| / 2^e <= 448, elements rounded to nearest-even E4M3."""
    k, n = w.shape
    values = np.zeros((k, n), ml_dtypes.float8_e4m3fn)
    exps = np.zeros((k // 32, n), np.uint8)
    for b in range(k // 32):
        for j in range(n):
            block = w[32 * b:32 * b + 32, j].astype(np.float64)
            amax = np.abs(block).max()
            e = -127
            if amax > 0:
                e = int(np.ceil(np.log2(amax / 448.0)))
                while amax / 2.0 ** e > 448.0:  # guard log2 rounding
                    e += 1
                while e > -127 and amax / 2.0 ** (e - 1) <= 448.0:
                    e -= 1
            exps[b, j] = e + 127
            values[32 * b:32 * b + 32, j] = (block / 2.0 ** e).astype(ml_dtypes.float8_e4m3fn)
    return values, exps


def weights(rng, k=96, n=40) -> np.ndarray:
    """Blocks of very different magnitudes, zeros, an exact power of two and a maximum just
    above 1.75 * 2^k (where the spec's floor rule would clip), and tiny values."""
    w = rng.standard_normal((k, n)) * np.exp2(rng.integers(-12, 8, (k // 32, 1, n))).repeat(
        32, 0).reshape(k, n)
    w[:32, 0] = 0.0
    w[32:64, 1] = 0.001 * rng.standard_normal(32)
    w[40, 1] = 4.0  # exact power of two as the block max
    w[5, 2] = 1.8 * np.abs(w[:32, 2]).max() * 2  # mantissa 1.8: OCP's rule would clip
    w[70, 3] = 1e-30  # subnormal territory after scaling
    return w.astype(np.float32)


def test_mxfp8_matches_numpy_reference():
    w = weights(np.random.default_rng(0))
    q = quantize(jnp.asarray(w), "mxfp8")
    values, exps = numpy_mxfp8(w)
    # stored output-major: values [N, K], scales [N, K / 32]
    np.testing.assert_array_equal(np.asarray(q.scales), exps.T)
    np.testing.assert_array_equal(np.asarray(q.values).view(np.uint8), values.T.view(np.uint8))
    assert q.values.dtype == jnp.float8_e4m3fn and q.scales.dtype == jnp.uint8
    assert q.shape == w.shape


def test_mxfp8_round_trip_bounds():
    """Per block: nothing clips (the maximum maps into (224, 448]), and each element is within
    half an E4M3 step: 2^-4 of itself in the normal range, 2^(e-10) in the subnormal range."""
    w = weights(np.random.default_rng(1))
    q = quantize(jnp.asarray(w), "mxfp8")
    back = np.asarray(dequantize(q), np.float64)
    e = np.asarray(q.scales).T.astype(np.int64) - 127
    scale = np.repeat(np.exp2(e), 32, axis=0)
    assert np.all(np.isfinite(back))
    blocks_max = np.abs(w.reshape(-1, 32, w.shape[1])).max(1)
    live = blocks_max > 0
    assert np.all(blocks_max[live] / np.exp2(e[live]) <= 448)
    assert np.all(blocks_max[live] / np.exp2(e[live]) > 224)
    err = np.abs(back - w)
    assert np.all(err <= np.maximum(2.0 ** -4 * np.abs(w), scale * 2.0 ** -10) * (1 + 1e-9))


def test_per_channel_round_trip_bounds():
    w = weights(np.random.default_rng(2))
    q = quantize(jnp.asarray(w), "fp8-channel")
    amax = np.abs(w).max(0)
    np.testing.assert_allclose(np.asarray(q.scales)[:, 0], amax / 448, rtol=1e-6)
    back = np.asarray(dequantize(q), np.float64)
    step = np.asarray(q.scales)[:, 0] * 2.0 ** -10  # half the subnormal step
    assert np.all(np.abs(back - w) <= np.maximum(2.0 ** -4 * np.abs(w), step) * (1 + 1e-6))


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown FP8 scheme"):
        quantize(jnp.ones((32, 4)), "int4")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(jnp.ones((48, 4)), "mxfp8")
