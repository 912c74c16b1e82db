"""Per-(layer, KV head) statistics of keys and values, measured once on a fixed text: their
means (centring compressed caches) and largest magnitudes (scaling FP8 caches).

A compressed cache encodes each key or value minus its layer and head's mean (and adds the
mean back when decoding). Keys of real models share a large common direction, so removing the
mean shrinks their norm, and a quantizer's error grows with the norm it is given. Centring
changes nothing but what is quantized (the mean is added back on read), and cuts the 4-bit
score error of every quantizer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.cache.kv import AttentionMetadata, KVCache
from dendrite_jax.config import ModelConfig
from dendrite_jax.model.llama import forward
from kernels_pallas.paged_attention.fp8 import FP8_MAX, Fp8Calibration

CALIBRATION_TEXT = (
    "The library opened at nine, and by ten the long tables were full. A student copied "
    "equations from a worn textbook while an old man read the morning paper aloud to nobody "
    "in particular. Outside, rain had turned the square into a mirror; buses hissed past and "
    "pigeons sheltered under the statue of the town's founder. In the reading room the clock "
    "was five minutes fast, as it had been for years, and the librarian, who knew it, set her "
    "watch by the church bell instead. She stamped returned books, answered questions about "
    "train times and tax forms, and at noon ate an apple at her desk, looking at the maps.")
CALIBRATION_TOKENS = 256


def calibration_ids(tokenizer, vocab_size: int) -> list[int]:
    """The calibration tokens: the fixed text through the model's tokenizer, or (a model
    without one) fixed pseudo-random ids."""
    if tokenizer is not None:
        ids = tokenizer.encode(CALIBRATION_TEXT)
        return (ids * (CALIBRATION_TOKENS // len(ids) + 1))[:CALIBRATION_TOKENS]
    rng = np.random.Generator(np.random.PCG64(0))
    return rng.integers(1, vocab_size, CALIBRATION_TOKENS).tolist()


@functools.partial(jax.jit, static_argnames=("cfg", "num_tokens"))
def _prefill_kv(params, ids, cfg: ModelConfig, num_tokens: int):
    page_size = 16
    pages = -(-num_tokens // page_size)
    kv = KVCache.create(cfg, pages, page_size, params.embed.dtype)
    table = jnp.arange(pages, dtype=jnp.int32)[None]
    meta = AttentionMetadata.build(jnp.array([num_tokens], jnp.int32),
                                   jnp.array([num_tokens], jnp.int32), table,
                                   num_tokens=num_tokens, decode_only=num_tokens == 1,
                                   page_size=page_size, num_pages=pages)
    _, kv = forward(params, kv, ids, meta, cfg)
    shape = (cfg.num_layers, pages * page_size, cfg.num_kv_heads, cfg.head_dim)
    return kv.k.reshape(shape)[:, :num_tokens], kv.v.reshape(shape)[:, :num_tokens]


def prefill_kv(params, cfg: ModelConfig, ids: list[int]) -> tuple[jax.Array, jax.Array]:
    """Keys (after rotary) and values [L, T, Hkv, hd] of one sequence's prefill."""
    return _prefill_kv(params, jnp.asarray(ids, jnp.int32), cfg, len(ids))


def kv_means(params, cfg: ModelConfig, ids: list[int]) -> tuple[jax.Array, jax.Array]:
    """float32 mean key and value [L, Hkv, hd] over the tokens `ids`."""
    k, v = prefill_kv(params, cfg, ids)
    return (k.astype(jnp.float32).mean(axis=1), v.astype(jnp.float32).mean(axis=1))


# FP8 pages map this fraction of E4M3's range to the calibration text's largest centred
# magnitude of a channel: later values up to FP8_HEADROOM times larger still fit (beyond, they
# saturate). A channel's range is at least its head's largest over FP8_CHANNEL_FLOOR, so a
# channel nearly silent on the calibration text is not scaled for silence alone.
FP8_HEADROOM = 4.0
FP8_CHANNEL_FLOOR = 64.0


def kv_fp8_calibration(params, cfg: ModelConfig, ids: list[int]) -> Fp8Calibration:
    """Means and scales [L, Hkv, hd] of FP8 key and value pages
    (`kernels_pallas.paged_attention.fp8`): over the tokens `ids`, each (layer, KV head,
    channel)'s mean, and its largest magnitude less the mean, times FP8_HEADROOM, mapped to
    E4M3's largest value."""
    k, v = (x.astype(jnp.float32) for x in prefill_kv(params, cfg, ids))
    k_mean, v_mean = k.mean(axis=1), v.mean(axis=1)

    def scale(x: jax.Array, mean: jax.Array) -> jax.Array:
        amax = jnp.abs(x - mean[:, None]).max(axis=1)  # [L, Hkv, hd]
        floor = amax.max(axis=-1, keepdims=True) / FP8_CHANNEL_FLOOR
        return jnp.maximum(jnp.maximum(amax, floor), 1e-6) * FP8_HEADROOM / FP8_MAX

    return Fp8Calibration(k_mean=k_mean, v_mean=v_mean, k_scale=scale(k, k_mean),
                          v_scale=scale(v, v_mean))
