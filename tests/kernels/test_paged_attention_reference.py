"""The ragged paged attention reference against dense float64 attention in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from kernels_pallas.paged_attention import ragged_paged_attention
from tests.kernels.paged_attention_cases import make_case


def run_case(rng, q_lens, ctx_lens, **kwargs):
    inputs, expected, valid = make_case(rng, q_lens, ctx_lens, **kwargs)
    return np.asarray(ragged_paged_attention(**inputs), np.float64), expected, valid


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1], [1]),  # first token
    ([4], [4]),  # prefill only
    ([1, 1, 1], [7, 8, 9]),  # decodes straddling a page boundary (page_size 8)
    ([13, 1, 5, 1], [13, 40, 21, 17]),  # ragged mix: full prefill, decode, chunk, decode
    ([8, 16], [8, 16]),  # prompts exactly filling pages
    ([3, 1], [35, 64]),  # chunk deep into a context; decode at a full page
])
def test_matches_dense_attention(q_lens, ctx_lens):
    rng = np.random.default_rng(sum(q_lens) * 31 + sum(ctx_lens))
    out, expected, valid = run_case(rng, q_lens, ctx_lens)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-5)
    assert np.all(out[~valid] == 0)  # padding tokens produce zeros


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (8, 8), (6, 1)])
def test_grouped_query_attention(num_heads, num_kv_heads):
    rng = np.random.default_rng(num_heads)
    out, expected, valid = run_case(rng, [5, 1, 2], [11, 30, 2], num_heads=num_heads,
                                    num_kv_heads=num_kv_heads)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_sliding_window_and_soft_cap():
    rng = np.random.default_rng(7)
    out, expected, valid = run_case(rng, [9, 1], [25, 33], sliding_window=6, soft_cap=5.0)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-5)


def test_random_ragged_batches():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(1, 6))
        q_lens = [int(x) for x in rng.integers(1, 12, n)]
        ctx_lens = [q + int(rng.integers(0, 30)) for q in q_lens]
        out, expected, valid = run_case(rng, q_lens, ctx_lens, page_size=16, pad_decode=2,
                                        pad_prefill=int(rng.integers(0, 3)))
        np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-5)
