"""The FP8 KV cache on the real SmolLM2: E4M3 pages, centred and scaled per (layer, head,
channel) from a calibration text, hold 4x the float32 cache's pages in the same bytes, keep
greedy output on a plain prompt, and share and copy pages with their calibration (prefix
caching). With a full-precision tail longer than every sequence, the engine (chunked
prefill, concurrent requests in their own slots, decode) gives the float32 model's numbers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.cache.kv import KVCache
from dendrite_jax.config import ModelConfig
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE, Fp8Calibration
from tests.helpers import SMOLLM

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def fp8_llm():
    return LLM(**SMOLLM, kv_compression="fp8", enable_prefix_caching=True,
               kv_cache_bytes=1 << 26)


def test_pages_scales_and_capacity(fp8_llm):
    kv = fp8_llm.engine.runner.kv
    cfg = fp8_llm.config
    assert kv.k.dtype == kv.v.dtype == FP8_DTYPE
    c = kv.fp8
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    assert c.k_scale.shape == c.v_scale.shape == c.k_mean.shape == c.v_mean.shape == shape
    assert bool(jnp.all(c.k_scale > 0)) and bool(jnp.all(c.v_scale > 0))
    plain = KVCache.bytes_per_page(cfg, 16, "float32")
    assert plain == 4 * KVCache.bytes_per_page(cfg, 16, FP8_DTYPE)
    assert fp8_llm.engine.pool.num_pages == (1 << 26) // (plain // 4)


def test_greedy_output_and_a_shared_prefix(fp8_llm, smollm):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    assert fp8_llm.generate([PROMPT], greedy)[0].text == smollm.generate([PROMPT], greedy)[0].text
    # the second request reads the first's cached prompt pages (FP8, same scales)
    shared = "Paris is the capital of France and its largest city. " * 4 + PROMPT
    first = fp8_llm.generate([shared], greedy)[0]
    again = fp8_llm.generate([shared], greedy)[0]
    assert again.token_ids == first.token_ids
    assert fp8_llm.stats().prefix_cache.hit_rate > 0


def test_fp8_pages_need_their_calibration():
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    c = Fp8Calibration(*(jnp.zeros((2, 1, 8)),) * 2, *(jnp.ones((2, 1, 8)),) * 2)
    with pytest.raises(ValueError, match="FP8 pages need their calibration"):
        KVCache.create(cfg, 4, 4, FP8_DTYPE)
    with pytest.raises(ValueError, match="only they take one"):
        KVCache.create(cfg, 4, 4, "float32", fp8=c)
    kv = KVCache.create(cfg, 4, 4, FP8_DTYPE, fp8=c)
    copied = kv.copied(jnp.array([0]), jnp.array([1]))
    assert copied.fp8 is kv.fp8 and copied.k.dtype == FP8_DTYPE


@pytest.mark.parametrize("compression", ["fp8", "turboquant-mse-4"])
def test_a_tail_longer_than_the_sequences_gives_the_unquantized_model(smollm, compression):
    """Every position is attended from the tail, so any slot or ring mix-up shows (FP8 pages,
    and pages of codes on the reference backend)."""
    llm = LLM(**SMOLLM, kv_compression=compression, kv_full_precision_window=200,
              max_num_seqs=4, max_num_batched_tokens=32, kv_cache_bytes=1 << 26)
    tail = llm.engine.runner.kv.tail
    assert tail.window_k.shape[1:3] == (4, 200)
    prompts = [PROMPT, "Here are 5 tips for staying healthy:\n1." * 3,
               "Once upon a time, in a small village by the mountains, " * 4]
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=1, prompt_logprobs=1)
    ours, want = llm.generate(prompts, params), smollm.generate(prompts, params)
    for a, b in zip(ours, want, strict=True):
        assert a.token_ids == b.token_ids
        prompt = a.prompt_token_ids
        np.testing.assert_allclose([a.prompt_logprobs[i][prompt[i]].logprob
                                    for i in range(1, len(prompt))],
                                   [b.prompt_logprobs[i][prompt[i]].logprob
                                    for i in range(1, len(prompt))], atol=2e-4)
        np.testing.assert_allclose(
            [e[t].logprob for e, t in zip(a.logprobs, a.token_ids, strict=True)],
            [e[t].logprob for e, t in zip(b.logprobs, b.token_ids, strict=True)], atol=2e-4)
    # parallel samples: the second computes its own prompt (its slot's tail), not its
    # sibling's; each sampled token's logprob is the unquantized model's for that sequence
    prompt = llm.tokenizer.encode("A recipe for pancakes, step by step, for four people:")
    pair = llm.generate([prompt], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=0,
                                                 logprobs=1))[0].samples
    for sample in pair:
        ref = smollm.generate([prompt + sample.token_ids],
                              SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        np.testing.assert_allclose(
            [e[t].logprob for e, t in zip(sample.logprobs, sample.token_ids, strict=True)],
            [ref.prompt_logprobs[len(prompt) + i][t].logprob
             for i, t in enumerate(sample.token_ids)], atol=2e-4)
    assert llm.engine.pool.stats().used == 0  # every page went back
