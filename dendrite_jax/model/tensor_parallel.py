"""Tensor parallelism over a one-axis device mesh ("tp"): heads and MLP units split across devices.

Every device holds its query heads with their KV heads (q/k/v columns, o rows, the KV cache's
head axis) and its share of the MLP's hidden units (gate/up columns, down rows). The fused
projections are regrouped shard-major at load, so a plain split of their output axis hands each
device its own parts: w_qkv [D, (Hq + 2 Hkv) hd] becomes [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] and
w_gate_up [D, 2F] becomes [gate_0 up_0 | gate_1 up_1 | ...]; `ModelConfig.shards` tells the
model how to split them back (`model/llama.py`). Heads keep their order, so shard s owns query
heads [s Hq/tp, (s+1) Hq/tp) and exactly their KV heads. XLA partitions the matmuls from the
weights' shardings (one all-reduce after o and one after down per layer), and attention runs on
each device's heads under `shard_map`, so any attention backend (kernels included) sees a
one-device problem. A separate output matrix is split on the vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dendrite_jax.cache.kv import KVCache
from dendrite_jax.config import ModelConfig
from dendrite_jax.model.params import LayerParams, Params

AXIS = "tp"
COLUMN_SPLIT = ("w_qkv", "b_qkv", "w_gate_up")  # output axis split across devices
ROW_SPLIT = ("w_o", "w_down")  # input axis split


def check(cfg: ModelConfig, tp: int, num_devices: int | None = None) -> None:
    """Raise naming what keeps `cfg` from splitting `tp` ways on `num_devices` devices (default:
    the devices present)."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    devices = len(jax.devices()) if num_devices is None else num_devices
    if tp > devices:
        raise ValueError(f"tensor_parallel_size {tp} needs {tp} devices; {devices} present "
                         f"({jax.default_backend()})")
    if cfg.num_experts and tp > 1:
        raise ValueError(f"tensor_parallel_size {tp}: {cfg.name}'s mixture-of-experts layers "
                         "do not split across devices yet")
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"tensor_parallel_size {tp} does not divide {cfg.name}'s {name} "
                             f"({n})")


def make_mesh(tp: int, devices=None) -> Mesh:
    """A one-axis mesh over `devices` (default: the first `tp`)."""
    devices = list(devices) if devices is not None else jax.devices()[:tp]
    return Mesh(np.array(devices), (AXIS,))


def _shard_major(w: jax.Array, sizes: tuple[int, ...], tp: int) -> jax.Array:
    """Columns [A | B | ...] (widths `sizes`) -> [A_0 B_0 ... | A_1 B_1 ... | ...]."""
    parts = jnp.split(w, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    lead = w.shape[:-1]
    grouped = [p.reshape(*lead, tp, p.shape[-1] // tp) for p in parts]
    return jnp.concatenate(grouped, axis=-1).reshape(w.shape)


def regroup(params: Params, cfg: ModelConfig, tp: int) -> Params:
    """Params with the fused projections' columns grouped shard-major (see the module doc)."""
    qkv = (cfg.q_size, cfg.kv_size, cfg.kv_size)

    def layer(lp: LayerParams) -> LayerParams:
        out = dict(w_qkv=_shard_major(lp.w_qkv, qkv, tp),
                   w_gate_up=_shard_major(lp.w_gate_up, (cfg.intermediate_size,) * 2, tp))
        if lp.b_qkv is not None:
            out["b_qkv"] = _shard_major(lp.b_qkv, qkv, tp)
        return dataclasses.replace(lp, **out)

    layers = params.layers
    layers = tuple(map(layer, layers)) if isinstance(layers, tuple) else layer(layers)
    return dataclasses.replace(params, layers=layers)


def split_columns(x: jax.Array, sizes: tuple[int, ...], shards: int) -> list[jax.Array]:
    """The model's inverse of `regroup` on activations: x [..., sum(sizes)] laid out
    shard-major -> one array per part, [..., size] each, in head order."""
    if shards == 1:
        return jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    lead = x.shape[:-1]
    grouped = x.reshape(*lead, shards, sum(sizes) // shards)
    parts = jnp.split(grouped, np.cumsum([s // shards for s in sizes])[:-1].tolist(), axis=-1)
    return [p.reshape(*lead, size) for p, size in zip(parts, sizes, strict=True)]


def param_shardings(params: Params, mesh: Mesh) -> Params:
    """A NamedSharding for every weight: column- and row-split projections, the rest
    replicated. Stacked layers keep their leading layer axis whole."""
    def spec(name: str, a: jax.Array) -> NamedSharding:
        axes = [None] * a.ndim
        if name in COLUMN_SPLIT:
            axes[-1] = AXIS
        elif name in ROW_SPLIT:
            axes[-2] = AXIS
        return NamedSharding(mesh, P(*axes))

    def layer(lp: LayerParams) -> LayerParams:
        return LayerParams(**{f.name: None if getattr(lp, f.name) is None else
                              spec(f.name, getattr(lp, f.name))
                              for f in dataclasses.fields(LayerParams)})

    layers = params.layers
    replicated = NamedSharding(mesh, P())
    return Params(embed=replicated,
                  layers=tuple(map(layer, layers)) if isinstance(layers, tuple) else layer(layers),
                  final_norm=replicated,
                  lm_head=None if params.lm_head is None else lm_head_sharding(params, mesh))


def lm_head_sharding(params: Params, mesh: Mesh) -> NamedSharding:
    """A separate output matrix [D, V] is split on the vocabulary (each device reads 1/tp of it
    and computes its share of the logits) where tp divides V; a tied one stays with the
    replicated embedding, which token lookups read whole."""
    vocab = params.lm_head.shape[-1]
    return NamedSharding(mesh, P(None, AXIS) if vocab % mesh.size == 0 else P())


def kv_sharding(mesh: Mesh) -> KVCache:
    """The cache [L, N, page_size, Hkv, hd] split on its KV-head axis."""
    heads = NamedSharding(mesh, P(None, None, None, AXIS, None))
    return KVCache(k=heads, v=heads)


def attention_specs() -> tuple[P, P, P]:
    """shard_map specs of attention's operands: per-token heads [T, H, hd], pages, the rest."""
    return P(None, AXIS, None), P(None, None, None, AXIS, None), P()
