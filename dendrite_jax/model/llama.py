"""Llama-family decoder as pure functions over the Params pytree.

Covers Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm)
and SmolLM2. Rotary embeddings use the Hugging Face "rotate half" layout; GGUF checkpoints
are converted to it at load. Norms, softmax and logits are computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dendrite_jax.cache.compressed_kv import CompressedKVCache, PagedCache
from dendrite_jax.cache.kv import AttentionMetadata
from dendrite_jax.config import ModelConfig
from dendrite_jax.model.linear import linear, precision_for
from dendrite_jax.model.moe import MoeParams, RouterSpec, moe_mlp
from dendrite_jax.model.params import LayerParams, Params
from dendrite_jax.model.tensor_parallel import attention_specs, split_columns
from kernels_pallas import kv_compress
from kernels_pallas.codecs.fp8 import Fp8Weight
from kernels_pallas.paged_attention import write_and_attend


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def block_input(x: jax.Array, norm_weight: jax.Array, w: jax.Array | Fp8Weight,
                eps: float) -> jax.Array:
    """The input of a block whose first weight is `w`: rms_norm(x), or x itself where w has the
    norm folded in and normalises x in its own matmul (`quant.fp8`, `input_rms_eps`)."""
    if isinstance(w, Fp8Weight) and w.input_rms_eps is not None:
        return x
    return rms_norm(x, norm_weight, eps)


def rotary_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, 1, hd/2] of angle position * inv_freq: computed once per step, shared by
    every layer."""
    inv_freq = jnp.asarray(cfg.inv_freq(), jnp.float32)
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]


def rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [T, H, hd] by the step's angles (rotate-half layout)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rotary_qk(q: jax.Array, k: jax.Array, cos: jax.Array,
              sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`rotary` of queries [T, Hq, hd] and keys [T, Hkv, hd] as one elementwise op over their
    heads side by side: one kernel instead of two on a GPU, where each is a few microseconds
    of launch-bound work per layer."""
    both = rotary(jnp.concatenate([q, k], axis=1), cos, sin)
    return both[:, :q.shape[1]], both[:, q.shape[1]:]


def attention_block(lp: LayerParams, x: jax.Array, kv: PagedCache, layer: jax.Array,
                    meta: AttentionMetadata, angles: tuple[jax.Array, jax.Array],
                    cfg: ModelConfig, *, attention_backend: str) -> tuple[jax.Array, PagedCache]:
    num_tokens = x.shape[0]
    with jax.named_scope("qkv_proj"):
        qkv = linear(x, lp.w_qkv)
        if lp.b_qkv is not None:
            qkv = qkv + lp.b_qkv
        q, k, v = split_columns(qkv, (cfg.q_size, cfg.kv_size, cfg.kv_size), cfg.shards)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
    if lp.q_norm is not None:
        with jax.named_scope("qk_norm"):
            q = rms_norm(q, lp.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, lp.k_norm, cfg.rms_norm_eps)
    with jax.named_scope("rotary"):
        q, k = rotary_qk(q, k, *angles)
    with jax.named_scope("paged_attention"):
        kwargs = dict(sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window,
                      backend=attention_backend)
        where = (layer, meta.rows, meta.slot_pages, meta.slot_offsets)
        if isinstance(kv, CompressedKVCache) and kv.tail is not None:
            out, kv, tail = kv_compress.write_and_attend(
                q, k, v, kv, *where, full_tail=(kv.tail, meta.tail_tokens()), **kwargs)
            kv = dataclasses.replace(kv, tail=tail)
        elif isinstance(kv, CompressedKVCache):
            out, kv = kv_compress.write_and_attend(q, k, v, kv, *where, **kwargs)
        else:
            attend = functools.partial(write_and_attend, **kwargs)
            if cfg.shards > 1:  # each device attends with its own heads and KV pages
                # check_vma=False: Pallas kernels' outputs carry no varying-axis type.
                heads, pages, rest = attention_specs()
                attend = jax.shard_map(attend, in_specs=(heads,) * 3 + (pages,) * 2 + (rest,) * 4,
                                       out_specs=(heads, pages, pages), check_vma=False)
            if kv.fp8 is not None:  # FP8 pages (never on a mesh: `engine.settings`)
                attend = functools.partial(attend, fp8_pages=kv.fp8.layer(layer))
            if kv.tail is not None:  # and their full-precision sink and recent tokens
                attend = functools.partial(attend, full_tail=(kv.tail, meta.tail_tokens()))
                out, k_pages, v_pages, tail = attend(q, k, v, kv.k, kv.v, *where)
                kv = dataclasses.replace(kv, k=k_pages, v=v_pages, tail=tail)
            else:
                out, k_pages, v_pages = attend(q, k, v, kv.k, kv.v, *where)
                kv = dataclasses.replace(kv, k=k_pages, v=v_pages)
    with jax.named_scope("o_proj"):
        out = linear(out.reshape(num_tokens, cfg.q_size), lp.w_o)
    return out, kv


def swiglu_mlp(lp: LayerParams, x: jax.Array, shards: int = 1) -> jax.Array:
    gate_up = linear(x, lp.w_gate_up)
    half = gate_up.shape[-1] // 2
    gate, up = split_columns(gate_up, (half, half), shards)
    return linear(jax.nn.silu(gate) * up, lp.w_down)


def mlp(lp: LayerParams, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The layer's MLP: dense SwiGLU, or a mixture of SwiGLU experts (`model.moe`)."""
    if lp.router is None:
        return swiglu_mlp(lp, x, cfg.shards)
    spec = RouterSpec(cfg.num_experts, cfg.num_experts_per_tok, normalize=cfg.norm_topk_prob)
    return moe_mlp(MoeParams(router=lp.router, w_gate_up=lp.w_gate_up, w_down=lp.w_down),
                   x, spec)


@functools.partial(jax.jit, static_argnames=("cfg", "attention_backend"))
def decoder_layer(lp: LayerParams, layer: jax.Array, x: jax.Array, kv: PagedCache,
                  meta: AttentionMetadata, angles: tuple[jax.Array, jax.Array], *,
                  cfg: ModelConfig, attention_backend: str) -> tuple[jax.Array, PagedCache]:
    """One decoder layer: attention (its K/V written into `kv` at `layer`), then the MLP.

    Jitted on its own so that a step's unrolled layers, which share its shapes, are traced and
    lowered once and called per layer: Python's tracing and lowering (Pallas kernels
    included) of every layer was most of a GPU warm-up's time, and it holds the GIL, so
    compiling programs on several threads did not hide it. XLA inlines the calls: the step
    runs as the unrolled layers did."""
    with jax.named_scope("attention"):
        h = block_input(x, lp.attn_norm, lp.w_qkv, cfg.rms_norm_eps)
        attn, kv = attention_block(lp, h, kv, layer, meta, angles, cfg,
                                   attention_backend=attention_backend)
        x = x + attn
    with jax.named_scope("mlp"):
        h = block_input(x, lp.mlp_norm, lp.w_gate_up, cfg.rms_norm_eps)
        x = x + mlp(lp, h, cfg)
    return x, kv


def forward(params: Params, kv: PagedCache, input_ids: jax.Array, meta: AttentionMetadata,
            cfg: ModelConfig, *,
            attention_backend: str = "reference") -> tuple[jax.Array, PagedCache]:
    """Run the decoder over a step's flat tokens (`AttentionMetadata`). Returns final hidden
    states [T, D] and the cache with this step's keys/values written."""
    with jax.named_scope("embed"):
        x = params.embed[input_ids]
    with jax.named_scope("rotary"):
        angles = rotary_angles(meta.positions, cfg)

    def layer_step(carry, layer_inputs):
        x, kv = carry
        lp, layer = layer_inputs
        return decoder_layer(lp, layer, x, kv, meta, angles, cfg=cfg,
                             attention_backend=attention_backend), None

    with jax.named_scope("layers"):
        if isinstance(params.layers, LayerParams):  # stacked: one scan
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, kv), _ = jax.lax.scan(layer_step, (x, kv), (params.layers, layer_ids))
        else:  # per-layer arrays: unrolled
            for i, lp in enumerate(params.layers):
                with jax.named_scope(f"layer_{i}"):
                    (x, kv), _ = layer_step((x, kv), (lp, jnp.int32(i)))
    with jax.named_scope("final_norm"):
        x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return x, kv


def compute_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """Float32 logits [..., V] from final hidden states (tied or separate output matrix)."""
    with jax.named_scope("lm_head"):
        if params.lm_head is None:
            return jnp.einsum("...d,vd->...v", hidden, params.embed,
                              precision=precision_for(params.embed),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", hidden, params.lm_head,
                          precision=precision_for(params.lm_head),
                          preferred_element_type=jnp.float32)
