"""A full-precision tail (`paged_attention.tail`) over several steps of two sequences (chunked
prefill, mixed and decode-only steps, one sequence joining late): with FP8 pages each query
attends to position 0 and its last `window` positions exactly as written and to the rest as
the pages hold them, and the tail's merge equals one softmax over the whole context; with pages
of codes the GPU kernels give the reference's numbers, tail included."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import AttentionMetadata
from kernels_pallas import kv_compress
from kernels_pallas.paged_attention import tail as tail_lib
from kernels_pallas.paged_attention import write_and_attend
from kernels_pallas.paged_attention.fp8 import Fp8Calibration, quantize
from kernels_pallas.paged_attention.tail import FullPrecisionTail

PAGE, PAGES_PER_SEQ, HEADS, KV_HEADS, HEAD_DIM, WINDOW = 8, 6, 4, 2, 32, 5
LENGTH = PAGE * PAGES_PER_SEQ
# Each step: (tokens of sequence 0, of sequence 1) and whether it is decode-only.
STEPS = [((12, 0), False), ((9, 0), False), ((1, 7), False), ((1, 1), True), ((1, 6), False),
         ((1, 1), True), ((1, 1), True), ((3, 1), False), ((1, 1), True)]


def _calibration(rng) -> Fp8Calibration:
    mean = rng.standard_normal((KV_HEADS, HEAD_DIM)).astype(np.float32) * 3
    return Fp8Calibration(k_mean=jnp.asarray(mean), v_mean=jnp.asarray(-mean / 2),
                          k_scale=jnp.full((KV_HEADS, HEAD_DIM), 8 / 448, jnp.float32),
                          v_scale=jnp.full((KV_HEADS, HEAD_DIM), 8 / 448, jnp.float32))


def _as_stored(x: np.ndarray, mean, scale) -> np.ndarray:
    """What an FP8 page gives back for x [..., Hkv, hd]."""
    flat = jnp.asarray(x.reshape(-1, KV_HEADS, HEAD_DIM))
    q = np.asarray(quantize(flat, mean, scale)).astype(np.float32)
    return (q * np.asarray(scale) + np.asarray(mean)).reshape(x.shape)


def _oracle(q, k, v, stored_k, stored_v, pos: int, sliding: int | None = None) -> np.ndarray:
    """One query [Hq, hd] at `pos` over exact keys at 0 and (pos - WINDOW, pos], stored ones
    elsewhere (only the last `sliding` positions with a sliding window)."""
    first = 0 if sliding is None else max(0, pos - sliding + 1)
    j = np.arange(first, pos + 1)
    k, v, stored_k, stored_v = k[first:], v[first:], stored_k[first:], stored_v[first:]
    exact = (j == 0) | (j > pos - WINDOW)
    keys = np.where(exact[:, None, None], k[:len(j)], stored_k[:len(j)])
    values = np.where(exact[:, None, None], v[:len(j)], stored_v[:len(j)])
    group = HEADS // KV_HEADS
    keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
    s = np.einsum("hd,khd->hk", q, keys) / np.sqrt(HEAD_DIM)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hk,khd->hd", p, values)


@pytest.mark.parametrize("sliding", [None, 7])
@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_fp8_pages_with_a_tail_attend_exactly_to_the_sink_and_window(backend, sliding):
    """With a sliding window (7, wider than the tail's 5), positions past it are left out of
    both parts, the sink included."""
    rng = np.random.default_rng(3)
    cal = _calibration(rng)
    mean = np.asarray(cal.k_mean)
    k = (rng.standard_normal((2, LENGTH, KV_HEADS, HEAD_DIM)) + mean).astype(np.float32)
    v = (rng.standard_normal((2, LENGTH, KV_HEADS, HEAD_DIM)) - mean / 2).astype(np.float32)
    q = rng.standard_normal((2, LENGTH, HEADS, HEAD_DIM)).astype(np.float32)
    stored_k, stored_v = _as_stored(k, cal.k_mean, cal.k_scale), _as_stored(v, cal.v_mean,
                                                                            cal.v_scale)
    shape = (1, 2 * PAGES_PER_SEQ, PAGE, KV_HEADS, HEAD_DIM)
    k_pages = jnp.zeros(shape, jnp.float8_e4m3fn)
    v_pages = jnp.zeros(shape, jnp.float8_e4m3fn)
    # slots are 1 and 0 (not the rows' order) and a third slot stays unused
    tail = FullPrecisionTail.create(1, 3, WINDOW, KV_HEADS, HEAD_DIM, jnp.float32)
    slot_of = [1, 0]
    tables = np.arange(2 * PAGES_PER_SEQ, dtype=np.int32).reshape(2, PAGES_PER_SEQ)
    done = [0, 0]
    checked = 0
    for (counts, decode_only) in STEPS:
        rows = [r for r in range(2) if counts[r]] if not decode_only else [0, 1]
        num_tokens = len(rows) if decode_only else 16
        tok_q, tok_k, tok_v, where = [], [], [], []
        for r in rows:
            for i in range(counts[r]):
                p = done[r] + i
                tok_q.append(q[r, p]), tok_k.append(k[r, p]), tok_v.append(v[r, p])
                where.append((r, p))
        pad = num_tokens - len(where)
        zeros_q, zeros_kv = np.zeros((HEADS, HEAD_DIM)), np.zeros((KV_HEADS, HEAD_DIM))
        step_q = np.stack(tok_q + [zeros_q] * pad).astype(np.float32)
        step_k = np.stack(tok_k + [zeros_kv] * pad).astype(np.float32)
        step_v = np.stack(tok_v + [zeros_kv] * pad).astype(np.float32)
        q_lens = np.array([counts[r] for r in rows], np.int32)
        seq_lens = np.array([done[r] + counts[r] for r in rows], np.int32)
        meta = AttentionMetadata.build(jnp.asarray(q_lens), jnp.asarray(seq_lens),
                                       jnp.asarray(tables[rows]), num_tokens=num_tokens,
                                       decode_only=decode_only, page_size=PAGE,
                                       num_pages=shape[1],
                                       slot_ids=jnp.asarray([slot_of[r] for r in rows]))
        out, k_pages, v_pages, tail = write_and_attend(
            jnp.asarray(step_q), jnp.asarray(step_k), jnp.asarray(step_v), k_pages, v_pages,
            jnp.int32(0), meta.rows, meta.slot_pages, meta.slot_offsets,
            sm_scale=HEAD_DIM ** -0.5, sliding_window=sliding, backend=backend, fp8_pages=cal,
            full_tail=(tail, meta.tail_tokens()))
        out = np.asarray(out)
        for t, (r, p) in enumerate(where):
            want = _oracle(q[r, p], k[r], v[r], stored_k[r], stored_v[r], p, sliding)
            np.testing.assert_allclose(out[t], want, rtol=1e-4, atol=1e-4)
            checked += 1
        assert np.all(out[len(where):] == 0)
        for r in rows:
            done[r] += counts[r]
    assert checked == sum(sum(c) for c, _ in STEPS)
    # the tail holds each sequence's sink and its last WINDOW positions, exactly
    for r in range(2):
        slot = slot_of[r]
        np.testing.assert_array_equal(np.asarray(tail.sink_k[0, slot]), k[r, 0])
        for p in range(done[r] - WINDOW, done[r]):
            np.testing.assert_array_equal(np.asarray(tail.window_v[0, slot, p % WINDOW]), v[r, p])
    assert not np.asarray(tail.window_k[0, 2]).any()



def _steps(rng):
    """Each step's (q, k, v, metadata, [(row, position)] of its real tokens)."""
    q = rng.standard_normal((2, LENGTH, HEADS, HEAD_DIM)).astype(np.float32)
    k = (rng.standard_normal((2, LENGTH, KV_HEADS, HEAD_DIM)) + 2).astype(np.float32)
    v = rng.standard_normal((2, LENGTH, KV_HEADS, HEAD_DIM)).astype(np.float32)
    tables = np.arange(2 * PAGES_PER_SEQ, dtype=np.int32).reshape(2, PAGES_PER_SEQ)
    done = [0, 0]
    for counts, decode_only in STEPS:
        rows = [r for r in range(2) if counts[r]] if not decode_only else [0, 1]
        num_tokens = len(rows) if decode_only else 16
        where = [(r, done[r] + i) for r in rows for i in range(counts[r])]
        pad = num_tokens - len(where)

        def stack(x, heads, where=where, pad=pad):
            return jnp.asarray(np.stack([x[r, p] for r, p in where]
                                        + [np.zeros((heads, HEAD_DIM), np.float32)] * pad))
        meta = AttentionMetadata.build(
            jnp.asarray([counts[r] for r in rows], jnp.int32),
            jnp.asarray([done[r] + counts[r] for r in rows], jnp.int32),
            jnp.asarray(tables[rows]), num_tokens=num_tokens, decode_only=decode_only,
            page_size=PAGE, num_pages=2 * PAGES_PER_SEQ, slot_ids=jnp.asarray([1, 0])[jnp.asarray(rows)])
        yield stack(q, HEADS), stack(k, KV_HEADS), stack(v, KV_HEADS), meta, where
        for r in rows:
            done[r] += counts[r]


@pytest.mark.parametrize("compression", ["turboquant-mse-4", "turboquant-4"])
def test_code_kernels_with_a_tail_match_the_reference(compression):
    cfg = dataclasses.make_dataclass("Shape", ["num_layers", "num_kv_heads", "head_dim"])(
        1, KV_HEADS, HEAD_DIM)
    rng = np.random.default_rng(11)
    means = tuple(jnp.asarray(rng.standard_normal((1, KV_HEADS, HEAD_DIM)), jnp.float32)
                  for _ in range(2))
    caches = {b: CompressedKVCache.create(cfg, 2 * PAGES_PER_SEQ, PAGE, compression, means=means)
              for b in ("reference", "pallas_gpu")}
    tails = {b: FullPrecisionTail.create(1, 2, WINDOW, KV_HEADS, HEAD_DIM, jnp.float32)
             for b in caches}
    for q, k, v, meta, where in _steps(rng):
        outs = {}
        for b in caches:
            with jax.default_matmul_precision("highest"):
                outs[b], caches[b], tails[b] = kv_compress.write_and_attend(
                    q, k, v, caches[b], jnp.int32(0), meta.rows, meta.slot_pages,
                    meta.slot_offsets, sm_scale=HEAD_DIM ** -0.5, backend=b,
                    full_tail=(tails[b], meta.tail_tokens()))
        real = len(where)
        ref, got = np.asarray(outs["reference"]), np.asarray(outs["pallas_gpu"])
        np.testing.assert_allclose(got[:real], ref[:real], rtol=5e-5, atol=5e-5)
    np.testing.assert_array_equal(np.asarray(tails["pallas_gpu"].window_k),
                                  np.asarray(tails["reference"].window_k))


def test_decode_rows_without_a_token_leave_their_slots_alone():
    """A decode-only step may hold rows without a token anywhere (token r is row r's): each
    real row's slot takes its token (position 0's into the sink too) and reads it back in its
    context; an empty row's slot, and every other entry, keeps what it held."""
    window, slots = 4, 4
    marks = np.arange(slots * (1 + window), dtype=np.float32).reshape(slots, 1 + window) + 100
    state = FullPrecisionTail(
        sink_k=jnp.asarray(marks[None, :, 0, None, None]),
        sink_v=jnp.asarray(-marks[None, :, 0, None, None]),
        window_k=jnp.asarray(marks[None, :, 1:, None, None]),
        window_v=jnp.asarray(-marks[None, :, 1:, None, None]))
    q_lens, seq_lens = np.array([1, 0, 1, 1]), np.array([5, 0, 1, 9])  # positions 4, -, 0, 8
    meta = AttentionMetadata.build(jnp.asarray(q_lens, jnp.int32),
                                   jnp.asarray(seq_lens, jnp.int32),
                                   jnp.zeros((4, 2), jnp.int32), num_tokens=4, decode_only=True,
                                   page_size=16, num_pages=8)
    k = jnp.asarray([1.0, 2.0, 3.0, 4.0])[:, None, None]
    keys, values, _ = tail_lib.context(state, jnp.int32(0), k, -k, meta.tail_tokens())
    assert float(keys[2, 0, 0, 0]) == 3.0  # position 0: its own key is the sink
    assert [float(keys[t, -1, 0, 0]) for t in (0, 2, 3)] == [1.0, 3.0, 4.0]
    after = tail_lib.write(state, jnp.int32(0), keys, values, meta.tail_tokens())
    want_sink, want_ring = marks[:, 0].copy(), marks[:, 1:].copy()
    want_sink[2] = 3.0
    want_ring[0, 4 % window], want_ring[2, 0], want_ring[3, 8 % window] = 1.0, 3.0, 4.0
    np.testing.assert_array_equal(np.asarray(after.sink_k)[0, :, 0, 0], want_sink)
    np.testing.assert_array_equal(np.asarray(after.window_k)[0, :, :, 0, 0], want_ring)
    np.testing.assert_array_equal(np.asarray(after.window_v)[0, :, :, 0, 0], -want_ring)
