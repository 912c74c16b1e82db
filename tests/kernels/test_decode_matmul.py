"""The fused decode matmul kernel (Pallas interpret mode on CPU, compiled on a GPU) against a
float64 numpy answer and against the pure-JAX reference, on odd row counts, for each fused
variant; the dispatcher's tunings and its prefill-size fallback."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import decode_matmul as dispatch
from kernels_pallas.decode_matmul import gpu, reference

INTERPRET = jax.default_backend() != "gpu"  # compiled on a GPU
TUNING = gpu.MatmulTuning(block_n=16, block_k=32, num_warps=4, num_stages=2)
EPS = 1e-5


def numpy_answer(x, w, norm_weight, gate_up, residual):
    x = x.astype(np.float64)
    if norm_weight is not None:
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * norm_weight
    out = x @ w.astype(np.float64)
    if gate_up:
        gate, up = np.split(out, 2, axis=-1)
        out = gate / (1 + np.exp(-gate)) * up
    return out if residual is None else out + residual


def inputs(rng, rows, k=96, n=48, *, gate_up=False, normed=False, residual=False):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, 2 * n if gate_up else n)) / np.sqrt(k)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32) if normed else None
    r = rng.standard_normal((rows, n)).astype(np.float32) if residual else None
    return x, w, g, r


VARIANTS = {  # (norm, gate_up, residual): the model's four projections
    "qkv: norm + matmul": (True, False, False),
    "gate_up: norm + matmul + silu·up": (True, True, False),
    "o / down: matmul + residual": (False, False, True),
    "plain matmul": (False, False, False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_kernel_equals_float64_answer(variant, rows):
    normed, gate_up, residual = VARIANTS[variant]
    rng = np.random.default_rng(rows)
    x, w, g, r = inputs(rng, rows, gate_up=gate_up, normed=normed, residual=residual)
    got = gpu.decode_matmul(
        jnp.asarray(x), jnp.asarray(w), norm_weight=None if g is None else jnp.asarray(g),
        eps=EPS, gate_up=gate_up, residual=None if r is None else jnp.asarray(r),
        tuning=TUNING, interpret=INTERPRET)
    assert got.shape == (rows, 48)
    # float32 in, float32 accumulation at HIGHEST precision: errors of float32 rounding only.
    np.testing.assert_allclose(np.asarray(got), numpy_answer(x, w, g, gate_up, r),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_bfloat16_within_rounding_of_reference(variant):
    """bfloat16 inputs: the kernel rounds x·norm_weight before the dot and scales by the norm
    after it, the reference rounds the normed row; both stay within bf16 rounding (~2^-8
    relative) of the float64 answer, the kernel no further than the reference (it keeps the
    gate/up products in float32 until the store)."""
    normed, gate_up, residual = VARIANTS[variant]
    rng = np.random.default_rng(7)
    x, w, g, r = inputs(rng, 33, k=256, n=64, gate_up=gate_up, normed=normed,
                        residual=residual)
    bf = [None if a is None else jnp.asarray(a, jnp.bfloat16) for a in (x, w, g, r)]
    kw = dict(norm_weight=bf[2], eps=EPS, gate_up=gate_up, residual=bf[3])
    got = np.asarray(gpu.decode_matmul(bf[0], bf[1], **kw, tuning=TUNING, interpret=INTERPRET),
                     np.float64)
    ref = np.asarray(reference.decode_matmul(bf[0], bf[1], **kw), np.float64)
    exact = numpy_answer(*(None if a is None else np.asarray(a, np.float64) for a in bf[:1]),
                         np.asarray(bf[1], np.float64),
                         None if bf[2] is None else np.asarray(bf[2], np.float64), gate_up,
                         None if bf[3] is None else np.asarray(bf[3], np.float64))
    scale = np.abs(exact).mean()
    ours_error = np.abs(got - exact).mean() / scale
    reference_error = np.abs(ref - exact).mean() / scale
    assert reference_error < 8e-3
    assert ours_error < 1.25 * reference_error


def test_dispatch_uses_kernel_for_decode_rows_and_xla_for_prefill(monkeypatch):
    calls = []
    real = gpu.decode_matmul

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(gpu, "decode_matmul", spy)
    rng = np.random.default_rng(0)
    for rows in (4, gpu.MAX_ROWS + 1):
        x, w, g, r = inputs(rng, rows, k=64, n=32, normed=True)
        with jax.default_matmul_precision("highest"):  # XLA's float32 dot, not TF32, on a GPU
            got = dispatch.decode_matmul(jnp.asarray(x), jnp.asarray(w), norm_weight=jnp.asarray(g),
                                         eps=EPS, backend="pallas_gpu")
        np.testing.assert_allclose(np.asarray(got), numpy_answer(x, w, g, False, None),
                                   rtol=2e-5, atol=2e-5)
    assert calls == [(4, 64)]  # the 65-row (prefill) matmul went to XLA


def test_tunings_fit_the_model_shapes():
    """Every projection of the benchmark shapes and SmolLM2 gets a kernel tuning."""
    shapes = {"llama-3.2-1b": (2048, 3072, 2048, 8192), "llama-3.1-8b": (4096, 6144, 4096, 14336),
              "smollm2-135m": (576, 960, 576, 1536)}
    for hidden, qkv, q, mlp in shapes.values():
        for k, n, gate_up in ((hidden, qkv, False), (q, hidden, False), (hidden, mlp, True),
                              (mlp, hidden, False)):
            tuning = dispatch.gpu_tuning(64, k, n, gate_up)
            assert tuning is not None and gpu.supports(64, k, n, tuning), (k, n)
    assert dispatch.gpu_tuning(65, 2048, 2048, False) is None
    assert dispatch.gpu_tuning(8, 2048, 2047, False) is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown matmul backend"):
        dispatch.resolve_backend("cublas")
    x = jnp.ones((2, 32))
    with pytest.raises(ValueError, match="unknown matmul backend"):
        dispatch.decode_matmul(x, jnp.ones((32, 32)), backend="cublas")


def test_kernel_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="does not take"):
        gpu.decode_matmul(jnp.ones((3, 40)), jnp.ones((40, 32)), tuning=TUNING, interpret=True)
