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
    # Decode row 0: one token at position 2 (context 3). Prefill row 1 (padded to 4 tokens):
    # 3 new tokens at positions 4..6 (context 7). Token layout: [d0, p0, p1, p2, pad].
    q_lens = jnp.array([1, 3], jnp.int32)
    seq_lens = jnp.array([3, 7], jnp.int32)
    tables = jnp.array([[0, 0], [5, 2]], jnp.int32)
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, num_decode=1, max_q_len=4,
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
