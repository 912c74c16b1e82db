"""Tensor-parallel sharding of the model's pytrees (`dendrite_jax.model.tensor_parallel`): the
regrouped fused weights split back as the model splits them, and sizes that cannot split are
refused (runs on several devices: tests/parallel/test_tensor.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dendrite_jax.config import ModelConfig
from dendrite_jax.model import tensor_parallel


def test_regroup_round_trip():
    """The model's column split undoes `regroup` on activations."""
    cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=1,
                      num_heads=6, num_kv_heads=3, head_dim=2, max_position_embeddings=16)
    sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
    x = np.arange(2 * sum(sizes), dtype=np.float32).reshape(2, sum(sizes))
    grouped = tensor_parallel._shard_major(x, sizes, 3)
    assert not np.array_equal(grouped, x)
    for a, b in zip(tensor_parallel.split_columns(grouped, sizes, 3),
                    np.split(x, np.cumsum(sizes)[:-1], axis=-1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_sizes_are_refused():
    cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=1,
                      num_heads=6, num_kv_heads=3, head_dim=2, max_position_embeddings=16)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tensor_parallel.check(cfg, 2, num_devices=8)
    with pytest.raises(ValueError, match="3 devices; 1 present"):
        tensor_parallel.check(cfg, 3, num_devices=1)
