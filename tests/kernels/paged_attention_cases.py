"""Random ragged paged-attention batches with a dense float64 answer, shared by the kernel
tests."""

from __future__ import annotations

import numpy as np


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


def make_case(rng, q_lens, ctx_lens, *, num_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
              num_layers=2, layer=1, pad_decode=1, pad_prefill=1, sliding_window=None,
              soft_cap=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Inputs for `ragged_paged_attention`, the float64 dense answer and which tokens are
    real. Random batch: row i has ctx_lens[i] tokens of context, its last q_lens[i] are queries.
    Rows with one query form the decode block, the rest the prefill block (padded to a power
    of two), each with extra padding rows. Pages come in a random order from a shared pool."""
    decode = [i for i, q in enumerate(q_lens) if q == 1]
    prefill = [i for i, q in enumerate(q_lens) if q > 1]
    order = decode + [None] * pad_decode + prefill + [None] * (pad_prefill if prefill else 0)
    num_decode = len(decode) + pad_decode
    max_q_len = 1 << (max([q_lens[i] for i in prefill], default=1) - 1).bit_length()
    num_seqs = len(order)
    pages_per_seq = max(-(-c // page_size) for c in ctx_lens) + 1
    num_pages = num_seqs * pages_per_seq + 3
    k_pages = rng.standard_normal((num_layers, num_pages, page_size, num_kv_heads, head_dim))
    v_pages = rng.standard_normal(k_pages.shape)
    page_ids = rng.permutation(num_pages)
    num_tokens = num_decode + (num_seqs - num_decode) * max_q_len
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    page_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    q_len_arr = np.zeros(num_seqs, np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    expected = np.zeros_like(q)
    valid = np.zeros(num_tokens, bool)
    for row, i in enumerate(order):
        if i is None:
            continue
        ql, ctx = q_lens[i], ctx_lens[i]
        start = row if row < num_decode else num_decode + (row - num_decode) * max_q_len
        n_pages = -(-ctx // page_size)
        page_tables[row, :n_pages] = page_ids[row * pages_per_seq:row * pages_per_seq + n_pages]
        q_len_arr[row], seq_lens[row] = ql, ctx
        k = k_pages[layer, page_tables[row, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_pages[layer, page_tables[row, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        positions = np.arange(ctx - ql, ctx)
        expected[start:start + ql] = dense_attention(q[start:start + ql], k, v, positions,
                                                     head_dim ** -0.5, sliding_window, soft_cap)
        valid[start:start + ql] = True
    inputs = dict(q=q.astype(np.float32), k_pages=k_pages.astype(np.float32),
                  v_pages=v_pages.astype(np.float32), layer=np.int32(layer), q_lens=q_len_arr,
                  seq_lens=seq_lens, page_tables=page_tables, num_decode=num_decode,
                  max_q_len=max_q_len, sm_scale=head_dim ** -0.5,
                  sliding_window=sliding_window, soft_cap=soft_cap)
    return inputs, expected, valid
