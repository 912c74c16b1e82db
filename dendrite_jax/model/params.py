"""Params pytree for a Llama-family decoder, layers stacked on a leading axis for `lax.scan`.

Projections are stored fused and laid out `[in, out]` so every matmul is `x @ w`:
`w_qkv = [wq | wk | wv]` and `w_gate_up = [w_gate | w_up]` along the output axis. On a
memory-bound decode step one wide matmul beats three narrow ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """Per-layer weights, each with a leading [num_layers] axis."""

    attn_norm: jax.Array  # [L, D]
    w_qkv: jax.Array  # [L, D, (Hq + 2 Hkv) * hd]
    w_o: jax.Array  # [L, Hq * hd, D]
    mlp_norm: jax.Array  # [L, D]
    w_gate_up: jax.Array  # [L, D, 2 F]; experts: [L, E, D, 2 F]
    w_down: jax.Array  # [L, F, D]; experts: [L, E, F, D]
    b_qkv: jax.Array | None = None  # [L, (Hq + 2 Hkv) * hd]  (Qwen2)
    q_norm: jax.Array | None = None  # [L, hd]  (Qwen3)
    k_norm: jax.Array | None = None  # [L, hd]  (Qwen3)
    router: jax.Array | None = None  # [L, D, E]  (a mixture of experts: `model.moe`)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """`layers` is one stacked LayerParams (iterated with `lax.scan`) or a tuple of per-layer
    LayerParams (iterated by an unrolled loop); see `LAYER_LOOPS`."""

    embed: jax.Array  # [V, D]
    layers: LayerParams | tuple[LayerParams, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to `embed`


# How the forward pass iterates layers. "scan": one lax.scan over stacked weights; compile time
# independent of depth. "unrolled": a Python loop over per-layer arrays. On a GPU the unrolled loop
# decodes faster (the scan copies each layer's slice out of the stack before its matmul); on a CPU
# the scan decodes as fast, compiles faster and needs fewer temporaries (XLA:CPU keeps consecutive
# unrolled layers' buffers apart). So "auto" scans on CPUs and unrolls elsewhere, and unrolls
# wherever layers differ in kind (FP8 layers beside unquantized ones).
LAYER_LOOPS = ("auto", "scan", "unrolled")


def resolve_layer_loop(layer_loop: str, platform: str, *, mixed_layers: bool = False) -> str:
    """"scan" or "unrolled" for `layer_loop` on `platform` ("cpu", "gpu", "tpu")."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    if layer_loop != "auto":
        return layer_loop
    return "scan" if platform == "cpu" and not mixed_layers else "unrolled"


def with_layer_loop(params: Params, layer_loop: str, *, consume: bool = False) -> Params:
    """Params whose `layers` suit `layer_loop` ("scan" or "unrolled").

    With `consume`, each stacked weight is deleted as soon as it is split, so the device holds
    one copy of the weights plus one weight in flight, not two copies (an 8B model is 16 GB).
    """
    stacked = isinstance(params.layers, LayerParams)
    if layer_loop == "unrolled" and stacked:
        count = params.layers.attn_norm.shape[0]
        per_layer: dict[str, list] = {}
        for field in dataclasses.fields(LayerParams):
            a = getattr(params.layers, field.name)  # an array, None, or an FP8 weight pytree
            per_layer[field.name] = [jax.tree.map(lambda x, i=i: x[i], a)
                                     for i in range(count)]
            if consume:
                for leaf in jax.tree.leaves(a):
                    leaf.delete()
        layers = tuple(LayerParams(**{name: per_layer[name][i] for name in per_layer})
                       for i in range(count))
    elif layer_loop == "scan" and not stacked:
        layers = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *params.layers)
    else:
        return params
    return dataclasses.replace(params, layers=layers)


def param_shapes(cfg: ModelConfig) -> Params:
    """The shape of every weight, as a Params of tuples: the one description of the layout."""
    d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv = cfg.q_size + 2 * cfg.kv_size
    experts = (cfg.num_experts,) if cfg.num_experts else ()
    if experts:
        f = cfg.moe_intermediate_size
    layers = LayerParams(
        attn_norm=(n, d), w_qkv=(n, d, qkv), w_o=(n, cfg.q_size, d), mlp_norm=(n, d),
        w_gate_up=(n, *experts, d, 2 * f), w_down=(n, *experts, f, d),
        b_qkv=(n, qkv) if cfg.attention_bias else None,
        q_norm=(n, cfg.head_dim) if cfg.qk_norm else None,
        k_norm=(n, cfg.head_dim) if cfg.qk_norm else None,
        router=(n, d, cfg.num_experts) if experts else None,
    )
    return Params(embed=(cfg.vocab_size, d), layers=layers, final_norm=(d,),
                  lm_head=None if cfg.tie_word_embeddings else (d, cfg.vocab_size))


def _is_shape(x: object) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def check_shapes(params: Params, cfg: ModelConfig, source: str) -> None:
    """Raise naming the first weight whose shape disagrees with the config."""
    expected = jax.tree_util.tree_leaves_with_path(param_shapes(cfg), is_leaf=_is_shape)
    actual = dict(jax.tree_util.tree_leaves_with_path(params))
    if len(expected) != len(actual):
        raise ValueError(f"{source}: expected {len(expected)} weight arrays, found {len(actual)}")
    for path, shape in expected:
        got = actual.get(path)
        if got is None or tuple(got.shape) != shape:
            name = jax.tree_util.keystr(path)
            raise ValueError(f"{source}: weight {name} has shape "
                             f"{None if got is None else tuple(got.shape)}, expected {shape}")


@jax.jit
def _finite(params: Params) -> tuple[Any, Any]:
    """Whether each weight array is all finite: per layer for stacked layer weights."""
    stacked = isinstance(params.layers, LayerParams)
    layers = jax.tree.map(
        lambda x: jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) if stacked else
        jnp.isfinite(x).all()[None], params.layers)
    rest = jax.tree.map(lambda x: jnp.isfinite(x).all(),
                        dataclasses.replace(params, layers=None))
    return layers, rest


def nonfinite_weights(params: Params) -> list[str]:
    """Names of the weights (with the layer) holding NaN or infinity, found on device in one
    read of the weights."""
    layers, rest = jax.device_get(_finite(params))
    found = [f"layers{jax.tree_util.keystr(path)} (layer {int(i)})"
             for path, flags in jax.tree_util.tree_leaves_with_path(layers)
             for i in np.flatnonzero(~np.asarray(flags))]
    found += [jax.tree_util.keystr(path).lstrip(".")
              for path, ok in jax.tree_util.tree_leaves_with_path(rest) if not ok]
    return found


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def random_params(key: jax.Array, cfg: ModelConfig, dtype: str) -> Params:
    """Random weights at real sizes, made on device (like vLLM's dummy load format).

    Norm weights are 1 and matrices ~N(0, 1/fan_in), so activations stay O(1) through depth.
    """
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, shape) in zip(keys, leaves, strict=True):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            out.append(jnp.ones(shape, dtype))
        elif "b_qkv" in name:
            out.append(jnp.zeros(shape, dtype))
        else:
            fan_in = shape[-1] if name == ".embed" else shape[-2]
            out.append((jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
