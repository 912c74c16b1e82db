"""The compressed KV cache in the engine: the write/read paths are exact where the codes are
(near-)lossless, pages are smaller, and prefix caching, preemption and beam forking keep
working on pages of codes without leaking any."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import KVCache, copy_pages
from dendrite_jax.model.calibration import calibration_ids, kv_means, prefill_kv
from dendrite_jax.search.beam import BeamSearchParams
from kernels_pallas.codecs.kv import IdentityCompressor, make_kv_compression
from kernels_pallas.kv_compress.reference import _read, write_codes
from tests.helpers import SMOLLM

TINY = dict(model="tiny-random", page_size=16, max_num_seqs=4, max_num_batched_tokens=32,
            max_model_len=256, compilation_cache=False, warmup=False,
            attention_backend="reference")
PROMPTS = [[(7 * i + j) % 500 + 1 for j in range(n)] for i, n in enumerate((5, 40, 17))]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain():
    return LLM(**TINY)


def test_identity_codes_give_the_plain_cache_tokens(plain):
    """A compressed cache whose codes are the float32 vectors themselves runs the compressed
    write and read paths (encode on write, gather and decode the rows' pages, across prefill
    chunks and decode steps) and must give the plain cache's greedy tokens exactly."""
    llm = LLM(**TINY)
    kv, identity = llm.engine.runner.kv, IdentityCompressor(llm.config.head_dim, "float32")
    means = [jnp.zeros(kv.k.shape[:1] + kv.k.shape[3:], jnp.float32) for _ in range(2)]
    llm.engine.runner.kv = CompressedKVCache(
        k={"x": jnp.zeros_like(kv.k)}, v={"x": jnp.zeros_like(kv.v)}, k_mean=means[0],
        v_mean=means[1],
        key_compressor=identity, value_compressor=identity)
    assert tokens(llm) == tokens(plain)


def test_means_are_removed_on_write_and_restored_on_read():
    """What the pages hold is x - mean[layer]; attention reads back x."""
    cfg = LLM(**TINY).config
    rng = np.random.default_rng(0)
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    k_mean, v_mean = (jnp.asarray(rng.standard_normal(shape) * 5, jnp.float32)
                      for _ in range(2))
    identity = IdentityCompressor(cfg.head_dim, "float32")
    pages = (cfg.num_layers, 4, 16, *shape[1:])
    kv = CompressedKVCache(k={"x": jnp.zeros(pages)}, v={"x": jnp.zeros(pages)},
                           k_mean=k_mean, v_mean=v_mean, key_compressor=identity,
                           value_compressor=identity)
    k = jnp.asarray(rng.standard_normal((3, *shape[1:])), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, *shape[1:])), jnp.float32)
    pages, offsets, layer = jnp.array([2, 2, 3]), jnp.array([0, 1, 5]), jnp.int32(1)
    kv = write_codes(kv, layer, k, v, pages, offsets)
    np.testing.assert_allclose(np.asarray(kv.k["x"][1, 2, 1]), np.asarray(k[1] - k_mean[1]),
                               rtol=1e-6, atol=1e-6)
    table = jnp.array([[2, 3]])
    np.testing.assert_allclose(np.asarray(_read(kv.k, identity, kv.k_mean, layer, table))[0, 21],
                               np.asarray(k[2]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(_read(kv.v, identity, kv.v_mean, layer, table))[0, 0],
                               np.asarray(v[0]), rtol=1e-5, atol=1e-5)


def test_centering_lowers_the_real_models_error(smollm):
    """The calibrated means (from a fixed text) centre SmolLM2's keys of another text: its
    keys' 4-bit reconstruction error falls by a third or more."""
    from tests.kernels.codecs.test_kv import TEXT

    cfg, params = smollm.config, smollm.model.params
    k_mean, _ = kv_means(params, cfg, calibration_ids(smollm.tokenizer, cfg.vocab_size))
    k, _ = prefill_kv(params, cfg, smollm.tokenizer.encode(TEXT))
    k = np.asarray(k, np.float64)
    c = make_kv_compression("turboquant-mse-4", cfg.head_dim)[0]

    def error(x):
        x_hat = np.asarray(c.decode(c.encode(jnp.asarray(x, jnp.float32))), np.float64)
        return np.sum((x - x_hat) ** 2)

    centred = k - np.asarray(k_mean, np.float64)[:, None]
    assert error(centred) < 0.67 * error(k)


def test_real_model_near_lossless(smollm):
    """PolarQuant-8 (~6e-5 relative squared error per vector): SmolLM2's greedy tokens are
    the plain cache's."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=8, temperature=0)
    llm = LLM(**SMOLLM, kv_compression="polarquant-8",
              max_num_seqs=2)
    assert tokens(llm, prompts, params) == tokens(smollm, prompts, params)


def test_compressed_pages_are_smaller(smollm):
    cfg = smollm.config
    bf16 = KVCache.bytes_per_page(cfg, 16, "bfloat16")
    assert CompressedKVCache.bytes_per_page(cfg, 16, "none") == bf16  # identity codes: bf16
    for name, at_least in (("turboquant-4", 3.8), ("polarquant-4", 3.7), ("turboquant-3", 5.0),
                           ("qjl-64", 1.6)):
        assert bf16 / CompressedKVCache.bytes_per_page(cfg, 16, name) >= at_least, name
    # More sequences fit the same byte budget (the engine sizes its pool from it).
    budget = dict(model="smollm2-135m", dtype="bfloat16", kv_cache_bytes=64 << 20,
                  warmup=False)
    plain, small = LLM(**budget), LLM(**budget, kv_compression="turboquant-4")
    assert small.engine.pool.num_pages >= 3.5 * plain.engine.pool.num_pages


def test_copy_pages_copies_codes():
    cfg = LLM(**TINY).config
    kv = CompressedKVCache.create(cfg, 6, 16, "turboquant-4")
    kv = dataclasses.replace(
        kv, k={n: a.at[:, 1].set(jnp.ones_like(a[:, 1])) for n, a in kv.k.items()},
        k_mean=jnp.arange(kv.k_mean.size, dtype=jnp.float32).reshape(kv.k_mean.shape))
    mean = np.asarray(kv.k_mean)
    out = copy_pages(kv, jnp.array([1], jnp.int32), jnp.array([4], jnp.int32))
    for name, a in out.k.items():
        np.testing.assert_array_equal(np.asarray(a[:, 4]), np.asarray(a[:, 1]))
        assert not np.asarray(a[:, 3]).any(), name
    np.testing.assert_array_equal(np.asarray(out.k_mean), mean)  # not a page array
    assert out.key_compressor is kv.key_compressor


def test_prefix_cache_hits_on_compressed_pages():
    llm = LLM(**TINY, kv_compression="turboquant-4", enable_prefix_caching=True)
    shared = [(3 * j) % 400 + 2 for j in range(48)]
    first = tokens(llm, [shared + [9]])
    second = tokens(llm, [shared + [9]])
    stats = llm.stats().prefix_cache
    assert stats.hit_tokens >= 32 and first == second


def test_preemption_recomputes_identical_codes():
    """With too few pages, requests are preempted and recomputed: encoding is deterministic,
    so the outputs equal a run with room for everyone, and no page leaks."""
    roomy = LLM(**TINY, kv_compression="turboquant-4")
    tight = LLM(**{**TINY, "num_pages": 9}, kv_compression="turboquant-4")
    params = SamplingParams(max_tokens=28, temperature=0, ignore_eos=True)  # 11 pages needed
    assert tokens(tight, PROMPTS, params) == tokens(roomy, PROMPTS, params)
    assert tight.stats().preemptions > 0
    assert tight.engine.pool.num_free == tight.engine.pool.num_pages


def test_beam_search_forks_compressed_pages():
    llm = LLM(**TINY, kv_compression="polarquant-4")
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    first = llm.beam_search([PROMPTS[1]], params)[0]
    again = llm.beam_search([PROMPTS[1]], params)[0]
    assert [b.token_ids for b in first.sequences] == [b.token_ids for b in again.sequences]
    assert len({tuple(b.token_ids) for b in first.sequences}) == 3
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def test_bad_compression_settings_are_refused():
    with pytest.raises(ValueError, match="unknown KV compression"):
        LLM(**TINY, kv_compression="zip-4")
    with pytest.raises(ValueError, match="no kernel for a 'polarquant-4' cache"):
        LLM(**{**TINY, "attention_backend": "pallas_gpu"}, kv_compression="polarquant-4")
