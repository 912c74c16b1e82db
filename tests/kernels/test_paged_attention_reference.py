"""The ragged paged attention reference against dense float64 attention in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from kernels_pallas.paged_attention import ragged_paged_attention


def dense_attention(q, k, v, q_positions, sm_scale, sliding_window=None, soft_cap=None):
    """q [n, Hq, d] at q_positions; k, v [ctx, Hkv, d]. float64 numpy."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    k_pos = np.arange(k.shape[0])
    mask = k_pos[None, :] <= q_positions[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_positions[:, None] - sliding_window
    scores = np.where(mask[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v)


def run_case(rng, q_lens, ctx_lens, *, num_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
             num_layers=2, layer=1, slack_seqs=1, sliding_window=None, soft_cap=None):
    """Random ragged batch: sequence i has ctx_lens[i] tokens, the last q_lens[i] are queries.
    Pages are assigned in a random order from a shared pool; one padding row is added."""
    num_seqs = len(q_lens) + slack_seqs
    pages_per_seq = max(-(-c // page_size) for c in ctx_lens) + 1
    num_pages = num_seqs * pages_per_seq + 3
    k_pages = rng.standard_normal((num_layers, num_pages, page_size, num_kv_heads, head_dim))
    v_pages = rng.standard_normal(k_pages.shape)
    page_ids = rng.permutation(num_pages)
    page_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    total = sum(q_lens)
    num_tokens = total + 5  # trailing padding tokens
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    cu = np.zeros(num_seqs + 1, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = total
    seq_lens = np.zeros(num_seqs, np.int32)
    seq_lens[:len(ctx_lens)] = ctx_lens
    expected = np.zeros_like(q)
    for s, (ql, ctx) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        n_pages = -(-ctx // page_size)
        page_tables[s, :n_pages] = page_ids[s * pages_per_seq:s * pages_per_seq + n_pages]
        k = k_pages[layer, page_tables[s, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_pages[layer, page_tables[s, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        positions = np.arange(ctx - ql, ctx)
        expected[cu[s]:cu[s] + ql] = dense_attention(q[cu[s]:cu[s] + ql], k, v, positions,
                                                     head_dim ** -0.5, sliding_window, soft_cap)
    max_q_len = 1 << (max(q_lens) - 1).bit_length()
    out = ragged_paged_attention(
        q.astype(np.float32), k_pages.astype(np.float32), v_pages.astype(np.float32),
        np.int32(layer), cu, seq_lens, page_tables, max_q_len=max_q_len,
        sm_scale=head_dim ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    return np.asarray(out, np.float64), expected, total


@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([1], [1]),  # first token
    ([1, 1, 1], [7, 8, 9]),  # decodes straddling a page boundary (page_size 8)
    ([13, 1, 5, 1], [13, 40, 21, 17]),  # ragged mix: full prefill, decode, chunk, decode
    ([8, 16], [8, 16]),  # prompts exactly filling pages
    ([3, 1], [35, 64]),  # chunk deep into a context; decode at a full page
])
def test_matches_dense_attention(q_lens, ctx_lens):
    rng = np.random.default_rng(sum(q_lens) * 31 + sum(ctx_lens))
    out, expected, total = run_case(rng, q_lens, ctx_lens)
    np.testing.assert_allclose(out[:total], expected[:total], rtol=1e-4, atol=1e-5)
    assert np.all(out[total:] == 0)  # padding tokens produce zeros


@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (8, 8), (6, 1)])
def test_grouped_query_attention(num_heads, num_kv_heads):
    rng = np.random.default_rng(num_heads)
    out, expected, total = run_case(rng, [5, 1, 2], [11, 30, 2], num_heads=num_heads,
                                    num_kv_heads=num_kv_heads)
    np.testing.assert_allclose(out[:total], expected[:total], rtol=1e-4, atol=1e-5)


def test_sliding_window_and_soft_cap():
    rng = np.random.default_rng(7)
    out, expected, total = run_case(rng, [9, 1], [25, 33], sliding_window=6, soft_cap=5.0)
    np.testing.assert_allclose(out[:total], expected[:total], rtol=1e-4, atol=1e-5)


def test_random_ragged_batches():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = int(rng.integers(1, 6))
        q_lens = [int(x) for x in rng.integers(1, 12, n)]
        ctx_lens = [q + int(rng.integers(0, 30)) for q in q_lens]
        out, expected, total = run_case(rng, q_lens, ctx_lens, page_size=16, slack_seqs=2)
        np.testing.assert_allclose(out[:total], expected[:total], rtol=1e-4, atol=1e-5)
