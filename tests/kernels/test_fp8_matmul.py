"""The FP8 weight matmul kernels (`kernels_pallas.fp8_matmul`) against the dequantize-then-
multiply reference on random odd shapes, both schemes, blocks of very different scales: the GPU
kernel compiled on a GPU and in interpret mode elsewhere, the TPU kernel in TPU interpret mode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.codecs import fp8
from kernels_pallas.fp8_matmul import fp8_matmul, gpu, reference_fp8_matmul, tpu

KERNELS = {"pallas_gpu": lambda x, w: gpu.fp8_matmul(x, w,
                                                     interpret=jax.default_backend() != "gpu"),
           "pallas_tpu": lambda x, w: tpu.fp8_matmul(x, w, interpret=True)}


def case(rng, m, k, n):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    scales = np.exp2(rng.integers(-6, 6, (k // 32, 1, n))).repeat(32, 0).reshape(k, n)
    return x, jnp.asarray(rng.standard_normal((k, n)) * scales, jnp.float32)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
@pytest.mark.parametrize("m,k,n", [(1, 1536, 576), (3, 96, 48), (17, 576, 960), (70, 64, 32)])
def test_kernel_matches_reference(kernel, scheme, m, k, n):
    rng = np.random.default_rng(m * k + n)
    x, w = case(rng, m, k, n)
    q = fp8.quantize(w, scheme)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(reference_fp8_matmul(x, q))
    got = np.asarray(KERNELS[kernel](x, q))
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("scheme", fp8.SCHEMES)
@pytest.mark.parametrize("k,n,splits,block_k", [(1536, 576, None, 256), (96, 48, 1, 64),
                                                 (512, 96, 4, 128), (2560, 80, 5, 512)])
def test_gemv_matches_reference(scheme, k, n, splits, block_k):
    """The one-row kernel (CUDA-core FMAs, `Fp8Tuning.gemv`) equals the reference."""
    rng = np.random.default_rng(k + n)
    x, w = case(rng, 1, k, n)
    q = fp8.quantize(w, scheme)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(reference_fp8_matmul(x, q))
    tuning = gpu.Fp8Tuning(gemv=True, k_splits=splits, gemv_block_k=block_k)
    assert gpu.plan(1, k, n, tuning)[0] == 1  # the one-row kernel
    got = np.asarray(gpu.fp8_matmul(x, q, tuning=tuning,
                                    interpret=jax.default_backend() != "gpu"))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_bfloat16_activations():
    rng = np.random.default_rng(5)
    x, w = case(rng, 8, 256, 128)
    q = fp8.quantize(w)
    x = x.astype(jnp.bfloat16)
    want = np.asarray(reference_fp8_matmul(x.astype(jnp.float32), q))
    for kernel in KERNELS.values():
        got = np.asarray(kernel(x, q), np.float32)
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_dispatch():
    """Decode-sized matmuls take the kernel; prefill-sized ones and odd widths the reference;
    both give the reference's numbers."""
    rng = np.random.default_rng(6)
    for m, n, kernel in ((4, 64, True), (200, 64, False), (4, 40, False)):
        x, w = case(rng, m, 64, n)
        q = fp8.quantize(w)
        jaxpr = str(jax.make_jaxpr(lambda x, q: fp8_matmul(x, q, "pallas_tpu"))(x, q))
        assert ("pallas_call" in jaxpr) == kernel, (m, n)
        with jax.default_matmul_precision("highest"):
            want = np.asarray(reference_fp8_matmul(x, q))
            got = np.asarray(fp8_matmul(x, q, "pallas_tpu"))
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    with pytest.raises(ValueError, match="unknown FP8 matmul backend"):
        fp8_matmul(x, q, "cuda")


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("scheme", fp8.SCHEMES)
@pytest.mark.parametrize("m,k,n", [(1, 1536, 576), (5, 96, 48)])
def test_folded_norm_matches_definition(kernel, scheme, m, k, n):
    """A weight with an RMS norm folded in (`input_rms_eps`) multiplies x / rms(x), however
    its kernel computes it (the GPU kernels sum x² as they stream x; one row and several):
    against numpy's definition, and the reference."""
    rng = np.random.default_rng(m + k)
    x, w = case(rng, m, k, n)
    x = x * 30.0  # a residual stream's scale: the norm has something to do
    norm = jnp.asarray(1 + 0.5 * rng.standard_normal(k), jnp.float32)
    q = dataclasses.replace(fp8.quantize(w, scheme, row_scale=norm), input_rms_eps=1e-5)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5)
    want = normed @ np.asarray(fp8.dequantize(q), np.float64)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(reference_fp8_matmul(x, q))
        got = np.asarray(KERNELS[kernel](x, q))
    for out in (ref, got):
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and the fold itself: the stored weight is the norm's weight times the original's rows
    unfolded = np.asarray(fp8.dequantize(fp8.quantize(w, scheme)), np.float64)
    folded = np.asarray(fp8.dequantize(q), np.float64) / np.asarray(norm, np.float64)[:, None]
    assert np.abs(folded - unfolded).mean() < 0.05 * np.abs(unfolded).mean()


def test_kernel_package_imports_first():
    """`kernels_pallas.fp8_matmul` imported before anything of `dendrite_jax` (a fresh
    interpreter): the kernels import nothing of `dendrite_jax`, whose package imports the
    engine and so the model, which imports this package back (tests/test_layers.py)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import kernels_pallas.fp8_matmul"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
