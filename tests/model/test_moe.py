"""The mixture-of-experts MLP: routing as each family defines it, the grouped computation
against a per-token loop on random routings (skewed, experts without tokens, every expert in one
step, one token), and whole blocks against transformers' own Qwen3-MoE and Mixtral classes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dendrite_jax.model.moe import MoeParams, RouterSpec, grouped_gated_mlp, moe_mlp, route

D, F, E = 16, 8, 6


def _silu(x):
    return x / (1 + np.exp(-x))


def _per_token(x, weights, experts, w_gate_up, w_down):
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], experts[t], strict=True):
            h = x[t].astype(np.float64) @ w_gate_up[e]
            out[t] += w * ((_silu(h[:F]) * h[F:]) @ w_down[e])
    return out


@pytest.mark.parametrize("scoring,normalize", [("softmax_topk", True), ("softmax_topk", False),
                                               ("topk_softmax", True)])
def test_route_as_each_family_defines_it(scoring, normalize):
    logits = np.random.default_rng(0).standard_normal((5, E)).astype(np.float32)
    weights, experts = map(np.asarray, route(jnp.asarray(logits), RouterSpec(E, 2, scoring,
                                                                             normalize)))
    top = np.argsort(-logits, axis=-1)[:, :2]
    np.testing.assert_array_equal(experts, top)
    picked = np.take_along_axis(logits, top, axis=-1)
    if scoring == "topk_softmax":  # softmax over the kept logits
        want = np.exp(picked) / np.exp(picked).sum(-1, keepdims=True)
    else:
        want = np.take_along_axis(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), top,
                                  axis=-1)
        if normalize:
            want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, want, rtol=1e-5)


def test_router_spec_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(4, 5)
    with pytest.raises(ValueError, match="scoring"):
        RouterSpec(4, 2, "sigmoid")
    with pytest.raises(ValueError, match="normalize"):
        RouterSpec(4, 2, "topk_softmax", normalize=False)


ROUTINGS = {
    "skewed": lambda rng, t: np.stack([np.zeros(t, int), np.ones(t, int)], axis=1),
    "experts_without_tokens": lambda rng, t: rng.choice([1, 4], size=(t, 2), replace=True),
    "every_expert": lambda rng, t: np.stack([np.arange(t) % E, (np.arange(t) + 1) % E], 1),
    "random": lambda rng, t: np.stack([rng.permutation(E)[:2] for _ in range(t)]),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("num_tokens", [1, 13])
def test_grouped_computation_equals_a_per_token_loop(routing, num_tokens):
    rng = np.random.default_rng(num_tokens)
    x = rng.standard_normal((num_tokens, D)).astype(np.float32)
    experts = ROUTINGS[routing](rng, num_tokens).astype(np.int32)
    weights = rng.uniform(0.1, 1, experts.shape).astype(np.float32)
    w_gate_up = rng.standard_normal((E, D, 2 * F)).astype(np.float32) / 4
    w_down = rng.standard_normal((E, F, D)).astype(np.float32) / 4
    out = grouped_gated_mlp(*map(jnp.asarray, (x, weights, experts, w_gate_up, w_down)))
    np.testing.assert_allclose(np.asarray(out), _per_token(x, weights, experts, w_gate_up, w_down),
                               rtol=1e-5, atol=1e-5)


def test_experts_run_as_two_grouped_matmuls():
    """As traced: one grouped matmul per projection and no tokens x experts intermediate (how
    XLA lowers `ragged_dot` is the platform's)."""
    spec = RouterSpec(E, 2)
    p = MoeParams(router=jnp.zeros((D, E)), w_gate_up=jnp.zeros((E, D, 2 * F)),
                  w_down=jnp.zeros((E, F, D)))
    jaxpr = jax.make_jaxpr(lambda x: moe_mlp(p, x, spec))(jnp.zeros((7, D)))
    names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert sum(name.startswith("ragged_dot") for name in names) == 2
    # no intermediate holds every token times every expert's hidden units
    text = str(jaxpr)
    assert f"f32[7,{E},{2 * F}]" not in text and f"f32[{E},7," not in text


def _transformers_block(family: str, normalize: bool):
    torch.manual_seed(0)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                             num_experts_per_tok=2, norm_topk_prob=normalize)
        block = Qwen3MoeSparseMoeBlock(cfg)
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                            num_experts_per_tok=2)
        block = MixtralSparseMoeBlock(cfg)
    for w in block.parameters():
        torch.nn.init.normal_(w, std=0.3)
    return block.eval()


@pytest.mark.parametrize("family,normalize", [("qwen3_moe", True), ("qwen3_moe", False),
                                              ("mixtral", True)])
def test_blocks_equal_transformers(family, normalize):
    block = _transformers_block(family, normalize)
    x = torch.randn(1, 11, D)
    with torch.no_grad():
        want = block(x)
        want = (want[0] if isinstance(want, tuple) else want)[0].numpy()
    params = MoeParams(
        router=jnp.asarray(block.gate.weight.detach().numpy().T),
        w_gate_up=jnp.asarray(block.experts.gate_up_proj.detach().numpy().transpose(0, 2, 1)),
        w_down=jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1)))
    out = moe_mlp(params, jnp.asarray(x[0].numpy()), RouterSpec(E, 2, normalize=normalize))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


def test_what_mixture_of_experts_layers_do_not_support_yet_is_refused():
    from dendrite_jax.config import ModelConfig
    from dendrite_jax.model import tensor_parallel
    from dendrite_jax.model.params import random_params
    from dendrite_jax.quant.fp8 import quantize_weights

    cfg = ModelConfig(vocab_size=32, hidden_size=D, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                      num_experts=E, num_experts_per_tok=2, moe_intermediate_size=F)
    params = random_params(jax.random.PRNGKey(0), cfg, "float32")
    assert params.layers.w_gate_up.shape == (2, E, D, 2 * F)
    assert params.layers.router.shape == (2, D, E)
    with pytest.raises(ValueError, match="FP8 weights for mixture-of-experts"):
        quantize_weights(params)
    with pytest.raises(ValueError, match="mixture-of-experts layers do not split"):
        tensor_parallel.check(cfg, 2, num_devices=2)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(vocab_size=32, hidden_size=D, intermediate_size=32, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
                    num_experts=E, num_experts_per_tok=E + 1, moe_intermediate_size=F)
