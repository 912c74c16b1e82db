"""The TPU (Pallas Mosaic) paged-attention kernel in TPU interpret mode against the pure-JAX
reference on random ragged batches. Interpret mode fills uninitialised memory with NaNs, so an
unwritten output or a read of an unfetched page fails the comparison."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import reference_ragged_paged_attention, tpu
from tests.kernels.paged_attention_cases import make_case

RTOL, ATOL = 2e-5, 2e-5  # float32 end to end: online vs one-pass softmax rounding


def check(case):
    inputs, expected, valid = case
    ref = np.asarray(reference_ragged_paged_attention(**inputs))
    out = np.asarray(tpu.ragged_paged_attention(**inputs, interpret=True))
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert np.all(out[~valid] == 0)  # padding query slots and empty rows give zeros


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1, 1, 1], [15, 16, 17]),  # decodes straddling a page boundary (page 16)
    ([13, 1, 5, 1], [13, 70, 21, 33]),  # ragged mix: full prefill, decode, chunk, decode
])
def test_matches_reference(q_lens, ctx_lens):
    rng = np.random.default_rng(sum(ctx_lens))
    check(make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=16, num_heads=8,
                    num_kv_heads=2, pad_decode=2, pad_prefill=1))


def test_gqa_head_dim_128_and_large_pages():
    rng = np.random.default_rng(5)
    check(make_case(rng, [1, 20, 1], [200, 60, 129], head_dim=128, page_size=64,
                    num_heads=9, num_kv_heads=3))


def test_sliding_window_and_soft_cap():
    rng = np.random.default_rng(7)
    check(make_case(rng, [24, 1, 1], [60, 75, 9], head_dim=64, page_size=16, num_heads=4,
                    num_kv_heads=2, sliding_window=21, soft_cap=5.0))


def test_bfloat16():
    rng = np.random.default_rng(11)
    inputs, _, valid = make_case(rng, [1, 17, 1], [50, 40, 120], head_dim=64, page_size=16,
                                 num_heads=8, num_kv_heads=2)
    for name in ("q", "k_pages", "v_pages"):
        inputs[name] = jnp.asarray(inputs[name], jnp.bfloat16)
    ref = np.asarray(reference_ragged_paged_attention(**inputs), np.float32)[valid]
    out = np.asarray(tpu.ragged_paged_attention(**inputs, interpret=True), np.float32)[valid]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2


def test_random_ragged_batches():
    """Random mixes of decode rows and prefill chunks with odd lengths and padding rows."""
    rng = np.random.default_rng(2027)
    for _ in range(4):
        n = int(rng.integers(1, 6))
        q_lens = [int(x) for x in rng.choice([1, 1, 2, 7, 19, 33], n)]
        ctx_lens = [q + int(rng.integers(0, 90)) for q in q_lens]
        check(make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=int(rng.choice([16, 32])),
                        num_heads=6, num_kv_heads=2, pad_decode=int(rng.integers(0, 3)),
                        pad_prefill=int(rng.integers(0, 3))))
