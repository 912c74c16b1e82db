"""Mixture-of-experts MLP as pure functions over stacked expert weights.

A router scores each token against every expert and keeps its top k; each expert's gated MLP
then runs over only the tokens routed to it. The token copies (T * k of them) are sorted by
expert so that one grouped matmul per projection (`jax.lax.ragged_dot`, each expert a group)
computes every expert's rows. This is the reference; how XLA lowers `ragged_dot` is the
platform's (XLA:CPU as a masked product over every expert), and a Pallas grouped-matmul kernel
for GPUs is still to come. Dropless: every routed copy is computed (the families served here
route without a capacity limit at inference). Each token's k results are summed in a fixed
order (no scatter-add), so a step's output does not depend on the order of atomics.

Weights are stacked on a leading expert axis, [E, D, 2F] (gate then up) and [E, F, D], in the
x @ w orientation of `model.linear`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dendrite_jax.model.linear import precision_for

SCORINGS = ("softmax_topk", "topk_softmax")


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """How a family routes: `top_k` experts per token, scored by "softmax_topk" (softmax over
    every expert, keep the top k, renormalise them where `normalize`: Mixtral, Qwen3-MoE) or
    "topk_softmax" (keep the top k logits, softmax over those: gpt-oss's order, normalised by
    construction, so `normalize` must stay True)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax_topk"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"router scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.scoring == "topk_softmax" and not self.normalize:
            raise ValueError("topk_softmax weights always sum to 1: normalize must be True")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"a router's top_k must be in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoeParams:
    """One layer's experts: router [D, E], gate/up [E, D, 2F], down [E, F, D]."""

    router: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array


def route(logits: jax.Array, spec: RouterSpec) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32)."""
    logits = logits.astype(jnp.float32)
    if spec.scoring == "softmax_topk":
        weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), spec.top_k)
        if spec.normalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    else:
        top, experts = jax.lax.top_k(logits, spec.top_k)
        weights = jax.nn.softmax(top, axis=-1)
    return weights, experts.astype(jnp.int32)


def grouped_gated_mlp(x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array,
                      w_down: jax.Array) -> jax.Array:
    """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]) for tokens x [T, D], each expert
    silu(x @ gate) * (x @ up) @ down, computed over the routed copies grouped by expert."""
    num_tokens, top_k = experts.shape
    num_experts = w_gate_up.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # copies grouped by expert, tokens in order within
    token_of = order // top_k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    precision = precision_for(w_gate_up)
    h = jax.lax.ragged_dot(x[token_of], w_gate_up, group_sizes, precision=precision)
    gate, up = jnp.split(h, 2, axis=-1)
    h = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(x.dtype)
    y = jax.lax.ragged_dot(h, w_down, group_sizes, precision=precision_for(w_down),
                           preferred_element_type=jnp.float32)
    per_copy = y[jnp.argsort(order)].reshape(num_tokens, top_k, -1)  # back in token order
    return jnp.einsum("tk,tkd->td", weights, per_copy,
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def moe_mlp(p: MoeParams, x: jax.Array, spec: RouterSpec) -> jax.Array:
    """The mixture-of-experts MLP of tokens x [T, D] (already normalised)."""
    logits = jnp.einsum("td,de->te", x, p.router, precision=precision_for(p.router),
                        preferred_element_type=jnp.float32)
    weights, experts = route(logits, spec)
    return grouped_gated_mlp(x, weights, experts, p.w_gate_up, p.w_down)
