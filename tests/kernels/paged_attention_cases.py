"""Random ragged paged-attention batches with a dense float64 answer, shared by the kernel
tests."""

from __future__ import annotations

import numpy as np

from kernels_pallas.paged_attention import ragged_rows


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
              soft_cap=None, decode_only=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Inputs for `ragged_paged_attention`, the float64 dense answer and which tokens are
    real. Random batch on one flat token axis: row i has ctx_lens[i] tokens of context, its
    last q_lens[i] are queries, in the order given (decode rows and prefill chunks mixed; a
    q_len of 0 is a row with context but no token this step), then `pad_decode` empty rows and
    `pad_prefill` padding tokens. A batch of one-token rows is laid out decode-only (token r is
    row r's, for every q_len of 0 or 1) unless `decode_only` is False. Pages come in a random
    order from a shared pool; page tables are wider than any context."""
    if decode_only is None:
        decode_only = all(q == 1 for q in q_lens)
    num_seqs = len(q_lens) + pad_decode
    num_tokens = num_seqs if decode_only else sum(q_lens) + pad_prefill
    pages_per_seq = max(-(-c // page_size) for c in ctx_lens) + 1
    num_pages = num_seqs * pages_per_seq + 3
    k_pages = rng.standard_normal((num_layers, num_pages, page_size, num_kv_heads, head_dim))
    v_pages = rng.standard_normal(k_pages.shape)
    page_ids = rng.permutation(num_pages)
    q = rng.standard_normal((num_tokens, num_heads, head_dim))
    page_tables = np.zeros((num_seqs, pages_per_seq), np.int32)
    q_len_arr = np.zeros(num_seqs, np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    expected = np.zeros_like(q)
    valid = np.zeros(num_tokens, bool)
    start = 0
    for row, (ql, ctx) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        assert ctx >= ql and (ql <= 1 or not decode_only), (ql, ctx, decode_only)
        if decode_only:
            start = row
        n_pages = -(-ctx // page_size)
        page_tables[row, :n_pages] = page_ids[row * pages_per_seq:row * pages_per_seq + n_pages]
        q_len_arr[row], seq_lens[row] = ql, ctx
        k = k_pages[layer, page_tables[row, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        v = v_pages[layer, page_tables[row, :n_pages]].reshape(-1, num_kv_heads, head_dim)[:ctx]
        positions = np.arange(ctx - ql, ctx)
        if ql:
            expected[start:start + ql] = dense_attention(
                q[start:start + ql], k, v, positions, head_dim ** -0.5, sliding_window,
                soft_cap)
        valid[start:start + ql] = True
        start += ql
    rows = ragged_rows(q_len_arr, seq_lens, page_tables, num_tokens=num_tokens,
                       decode_only=decode_only)
    inputs = dict(q=q.astype(np.float32), k_pages=k_pages.astype(np.float32),
                  v_pages=v_pages.astype(np.float32), layer=np.int32(layer), rows=rows,
                  sm_scale=head_dim ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    return inputs, expected, valid


def token_slots(inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each token's (page, offset) slot of a case's step and which tokens are real, from the
    flat layout's rule alone (not `ragged`'s arithmetic): row r's tokens follow the rows before
    it (token r is row r's in a decode-only step) and are its context's last q_len positions.
    Padding tokens get page N (outside the cache) and offset 0."""
    rows = inputs["rows"]
    q_lens, seq_lens = np.asarray(rows.q_lens), np.asarray(rows.seq_lens)
    tables = np.asarray(rows.page_tables)
    num_tokens, page_size = rows.num_tokens, inputs["k_pages"].shape[2]
    num_pages = inputs["k_pages"].shape[1]
    pages = np.full(num_tokens, num_pages, np.int32)
    offsets = np.zeros(num_tokens, np.int32)
    valid = np.zeros(num_tokens, bool)
    start = 0
    for row, (ql, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        if rows.decode_only:
            start = row
        for i, pos in enumerate(range(seq_len - ql, seq_len)):
            pages[start + i], offsets[start + i] = tables[row, pos // page_size], pos % page_size
            valid[start + i] = True
        start += ql
    return pages, offsets, valid
