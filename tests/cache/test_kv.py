"""KV writes land in the right page/offset (metadata + `write_pages`); copy_pages duplicates
whole pages."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dendrite_jax.cache.kv import AttentionMetadata, KVCache, copy_pages
from dendrite_jax.config import ModelConfig
from kernels_pallas.paged_attention import write_pages
from kernels_pallas.paged_attention.write import unique_slots

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=8, max_position_embeddings=64)


def test_writes_scatter_by_page_table_and_drop_padding():
    kv = KVCache.create(CFG, num_pages=6, page_size=4, dtype="float32")
    # Decode row 0: one token at position 2 (context 3). Prefill row 1: 3 new tokens at
    # positions 4..6 (context 7). Flat token axis of 5: [d0, p0, p1, p2, pad].
    q_lens = jnp.array([1, 3], jnp.int32)
    seq_lens = jnp.array([3, 7], jnp.int32)
    tables = jnp.array([[0, 0], [5, 2]], jnp.int32)
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, num_tokens=5, decode_only=False,
                                   page_size=4, num_pages=6)
    np.testing.assert_array_equal(meta.positions[:4], [2, 4, 5, 6])
    np.testing.assert_array_equal(meta.valid, [True, True, True, True, False])
    k = jnp.arange(5, dtype=jnp.float32)[:, None, None] + 1 + jnp.zeros((5, 1, 8))
    kv = KVCache(*write_pages(kv.k, kv.v, jnp.int32(1), k, -k, meta.slot_pages,
                              meta.slot_offsets))
    written = np.asarray(kv.k[1, :, :, 0, 0])
    assert written[2, 0] == 2 and written[2, 1] == 3 and written[2, 2] == 4  # 2nd page = page 2
    assert written[0, 2] == 1  # decode row, position 2 -> page 0 offset 2
    assert np.count_nonzero(written) == 4  # the padding token wrote nowhere
    assert np.count_nonzero(np.asarray(kv.k[0])) == 0  # other layer untouched
    np.testing.assert_array_equal(np.asarray(kv.v[1, 2, :3, 0, 0]), [-2, -3, -4])


def expected_tokens(q_lens, seq_lens, tables, num_tokens, decode_only, page_size, num_pages):
    """Each token's (row, position, valid, slot page, slot offset) by the flat layout's rule:
    row r's tokens follow the rows before it (token r is row r's in a decode-only step) and are
    its context's last q_len positions; padding tokens get page num_pages."""
    row = np.full(num_tokens, -1)
    position = np.zeros(num_tokens, int)
    start = 0
    for r, (ql, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        start = r if decode_only else start
        row[start:start + ql] = r
        position[start:start + ql] = np.arange(seq_len - ql, seq_len)
        start += ql
    valid = row >= 0
    pages = np.where(valid, np.asarray(tables)[row, position // page_size], num_pages)
    return row, position, valid, pages, position % page_size


def check_metadata(q_lens, seq_lens, num_tokens, decode_only):
    page_size, num_pages = 4, 16 * len(q_lens)
    rng = np.random.default_rng(len(q_lens))
    tables = rng.permutation(num_pages).reshape(len(q_lens), 16)  # pages in a random order
    meta = AttentionMetadata.build(jnp.asarray(q_lens, jnp.int32),
                                   jnp.asarray(seq_lens, jnp.int32),
                                   jnp.asarray(tables, jnp.int32), num_tokens=num_tokens,
                                   decode_only=decode_only, page_size=page_size,
                                   num_pages=num_pages)
    row, position, valid, pages, offsets = expected_tokens(
        q_lens, seq_lens, tables, num_tokens, decode_only, page_size, num_pages)
    np.testing.assert_array_equal(np.asarray(meta.valid), valid)
    np.testing.assert_array_equal(np.asarray(meta.token_seq)[valid], row[valid])
    np.testing.assert_array_equal(np.asarray(meta.positions)[valid], position[valid])
    np.testing.assert_array_equal(np.asarray(meta.slot_pages), pages)
    np.testing.assert_array_equal(np.asarray(meta.slot_offsets)[valid], offsets[valid])
    assert meta.rows.decode_only == decode_only and meta.rows.num_tokens == num_tokens


def test_metadata_of_a_mixed_flat_step():
    # Unsorted: a full prefill, a decode, a chunk deep into its context, a row without tokens,
    # a decode, a chunk; then a padding row and padding tokens.
    check_metadata([5, 1, 13, 0, 1, 3, 0], [5, 30, 50, 20, 17, 60, 0], 32, False)


def test_metadata_of_a_decode_only_step():
    check_metadata([1, 1, 1, 0, 0], [5, 9, 1, 0, 0], 5, True)


def test_metadata_of_a_decode_only_step_with_a_gap():
    """Token r is row r's in a decode-only step, whatever rows before it hold."""
    check_metadata([1, 0, 1, 1], [5, 9, 7, 3], 4, True)


def test_padding_tokens_get_distinct_out_of_range_slots():
    # The scatter promises unique indices: tokens outside the cache (page num_pages, as
    # `AttentionMetadata` pads, or negative) must not share a slot, and must still write nowhere.
    pages = jnp.array([3, 6, 6, 0, -1, 6], jnp.int32)
    offsets = jnp.array([1, 0, 0, 2, 0, 0], jnp.int32)
    new_pages, new_offsets = unique_slots(pages, offsets, num_pages=6, page_size=4)
    slots = list(zip(np.asarray(new_pages).tolist(), np.asarray(new_offsets).tolist(),
                     strict=True))
    assert len(set(slots)) == len(slots)
    assert slots[0] == (3, 1) and slots[3] == (0, 2)  # tokens inside the cache keep their slot
    assert all(p == 6 and o >= 4 for p, o in slots[1:3] + slots[4:])
    kv = KVCache.create(CFG, num_pages=6, page_size=4, dtype="float32")
    k = jnp.ones((6, 1, 8), jnp.float32)
    k_pages, _ = write_pages(kv.k, kv.v, jnp.int32(0), k, k, pages, offsets)
    written = np.asarray(k_pages[0, :, :, 0, 0])
    assert written[3, 1] == 1 and written[0, 2] == 1 and np.count_nonzero(written) == 2


def test_copy_pages_copies_every_layer():
    kv = KVCache.create(CFG, num_pages=4, page_size=4, dtype="float32")
    kv = KVCache(k=kv.k.at[:, 1].set(7.0), v=kv.v.at[:, 1].set(-7.0))
    kv = copy_pages(kv, jnp.array([1]), jnp.array([3]))
    assert np.all(np.asarray(kv.k[:, 3]) == 7.0) and np.all(np.asarray(kv.v[:, 3]) == -7.0)
    assert np.all(np.asarray(kv.k[:, 2]) == 0.0)
