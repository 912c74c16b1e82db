"""FP8 weights for the model (`dendrite_jax.quant.fp8`; the format's own tests are in
tests/kernels/codecs/test_fp8.py): the model's `linear` on them, the projections' error on
SmolLM2, quantized params stacked and unrolled, folded norms, kept layers, and the LLM
settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.model.linear import linear
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.params import with_layer_loop
from dendrite_jax.quant.fp8 import PROJECTIONS, multiplied_by, quantize_weights, weight_scheme
from kernels_pallas.codecs.fp8 import SCHEMES, Fp8Weight, dequantize, quantize
from tests.helpers import SMOLLM, paged_logits


def test_linear_is_dequantize_then_matmul():
    """The model's `linear` on one layer of a stacked FP8 weight, through each matmul backend
    (kernels in interpret mode off their platform)."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((3, 64, 24)), jnp.float32)  # stacked, like layers
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    for scheme in SCHEMES:
        q = quantize(w, scheme)
        layer = jax.tree.map(lambda a: a[1], q)  # what scan and unrolling hand a layer
        for matmul in ("reference", "pallas_gpu", "pallas_tpu"):
            layer = dataclasses.replace(layer, matmul=matmul)
            with jax.default_matmul_precision("highest"):
                np.testing.assert_allclose(np.asarray(linear(x, layer)),
                                           np.asarray(x @ dequantize(q)[1]), rtol=1e-5,
                                           atol=1e-5)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown weights_dtype"):
        weight_scheme("fp4")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", "float32")


def test_projection_errors_on_smollm2(smollm2):
    """Every projection of every layer of the real model, on random activations: the output's
    mean absolute error relative to float32 (E4M3 keeps 3 mantissa bits: ~2.6% is its floor)."""
    rng = np.random.default_rng(4)
    layers = smollm2.params.layers
    for name in PROJECTIONS:
        w = getattr(layers, name)
        x = jnp.asarray(rng.standard_normal((16, w.shape[1])), jnp.float32)
        ref = jnp.einsum("tk,lkn->ltn", x, w)
        for scheme in SCHEMES:
            out = jnp.einsum("tk,lkn->ltn", x, dequantize(quantize(w, scheme)))
            mae = jnp.mean(jnp.abs(out - ref), axis=(1, 2)) / jnp.mean(jnp.abs(ref), axis=(1, 2))
            assert float(mae.max()) < 0.03, (name, scheme, np.asarray(mae))


def test_quantized_params_stacked_and_unrolled(smollm2):
    """Quantizing stacked layers then unrolling equals quantizing unrolled layers, and the
    quantized projections take about half the bytes of bfloat16 ones."""
    stacked = quantize_weights(smollm2.params)
    unrolled = quantize_weights(with_layer_loop(smollm2.params, "unrolled"))
    a = jax.tree.leaves(with_layer_loop(stacked, "unrolled").layers)
    b = jax.tree.leaves(unrolled.layers)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    projections = [getattr(stacked.layers, n) for n in PROJECTIONS]
    fp8_bytes = sum(p.nbytes for p in projections)
    bf16_bytes = sum(np.prod(p.shape) * 2 for p in projections)
    assert 0.5 < fp8_bytes / bf16_bytes < 0.52  # one uint8 scale per 32 elements


def test_folded_norms_keep_the_model(smollm2):
    """With the model's epsilon, quantize_weights folds the attention and MLP norms into q/k/v
    and gate/up (what LLM does) and marks exactly those; SmolLM2's logits on real text stay as
    close to float32's as with the norms left apart (the same argmax almost everywhere)."""
    cfg = smollm2.config
    ids = smollm2.tokenizer.encode(
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type with an oil-based ink and a screw press. Books "
        "became cheaper, literacy spread, and ideas moved across Europe faster than before.")
    full = paged_logits(smollm2.params, cfg, ids)
    apart = paged_logits(quantize_weights(smollm2.params), cfg, ids)
    folded_params = quantize_weights(smollm2.params, rms_norm_eps=cfg.rms_norm_eps)
    assert [getattr(folded_params.layers, n).input_rms_eps for n in PROJECTIONS] == [
        cfg.rms_norm_eps, None, cfg.rms_norm_eps, None]
    folded = paged_logits(folded_params, cfg, ids)

    def error(logits):
        return np.abs(logits - full).mean() / np.abs(full).mean()

    assert error(folded) < 0.15 and error(folded) < 1.25 * error(apart), (error(folded),
                                                                          error(apart))
    agree = (folded.argmax(-1) == full.argmax(-1)).mean()
    assert agree >= 0.9 * (apart.argmax(-1) == full.argmax(-1)).mean() and agree > 0.8


def test_llm_with_fp8_weights_runs_and_mostly_agrees(smollm):
    """LLM(weights_dtype=...) quantizes at load; greedy continuations start like float32's
    (`smollm`: the same model in float32)."""
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=4, temperature=0)
    base = dict(**SMOLLM, compilation_cache=False)
    want = [o.token_ids for o in smollm.generate(prompts, params)]
    llm = LLM(**base, weights_dtype="fp8")
    w_qkv = llm.model.params.layers.w_qkv  # scanned layers: one stacked weight
    assert isinstance(w_qkv, Fp8Weight) and w_qkv.matmul == "reference"  # auto, on CPU
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert all(g[0] == w[0] for g, w in zip(got, want, strict=True))
    with pytest.raises(ValueError, match="unknown weights_dtype"):
        LLM(**base, weights_dtype="int8")


def test_fp8_params_are_a_pytree_of_arrays(smollm2):
    """Quantized weights go through jit, donation and tree utilities like arrays do."""
    q = quantize(smollm2.params.layers.w_o[0], "mxfp8")
    doubled = jax.jit(lambda w: dataclasses.replace(w, scales=w.scales + 1))(q)
    assert doubled.scheme == "mxfp8"
    np.testing.assert_allclose(np.asarray(dequantize(doubled)),
                               2 * np.asarray(dequantize(q)), rtol=1e-6)


def test_random_weight_preset_quantizes_at_load():
    llm = LLM(model="tiny-random", dtype="float32", weights_dtype="fp8-channel",
              compilation_cache=False, warmup=False)
    assert llm.model.params.layers.w_down.scheme == "fp8-channel"  # a scan on a CPU
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0,
                                                    ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_kernel_decode_matches_reference():
    """Decode at batch 1 through the GPU kernel's one-row path (interpret mode here; q/k/v and
    gate/up with their norms folded in, so the kernel sums x² too) gives the reference path's
    tokens and logprobs. Float32 dots at full precision: on a GPU XLA's default is TF32, ~1e-3
    off the kernel's float32 FMAs."""
    base = dict(model="tiny-random", dtype="float32", weights_dtype="fp8",
                compilation_cache=False, warmup=False)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=2)
    with jax.default_matmul_precision("highest"):
        outs = [LLM(**base, fp8_matmul=m).generate([[5, 6, 7, 8, 9]], params)[0]
                for m in ("reference", "pallas_gpu")]
    assert outs[0].token_ids == outs[1].token_ids
    def table(out):  # every position's top-2 logprobs, by token
        return [[pos[t].logprob for t in sorted(pos)] for pos in out.logprobs]

    assert [sorted(p) for p in outs[0].logprobs] == [sorted(p) for p in outs[1].logprobs]
    np.testing.assert_allclose(table(outs[1]), table(outs[0]), rtol=1e-4, atol=1e-4)


def test_multiplied_by_names_the_matmul_backend(smollm2):
    """What the engine asks to choose one-row FP8 steps on GPUs (`buckets.decode_rows_floor`)."""
    kernel = quantize_weights(smollm2.params, matmul="pallas_gpu")
    assert multiplied_by(kernel, "pallas_gpu")
    assert not multiplied_by(kernel, "reference")
    assert not multiplied_by(smollm2.params, "pallas_gpu")


def test_kept_layers_stay_unquantized(smollm2):
    """keep_layers (negative from the end) leaves exactly those layers' weights as they were;
    the rest are quantized as without it; stacked layers come back per layer."""
    kept = quantize_weights(smollm2.params, keep_layers=(0, 1, -1))
    plain = with_layer_loop(quantize_weights(smollm2.params), "unrolled").layers
    source = with_layer_loop(smollm2.params, "unrolled").layers
    assert isinstance(kept.layers, tuple) and len(kept.layers) == 30
    for i, layer in enumerate(kept.layers):
        for name in PROJECTIONS:
            got = getattr(layer, name)
            if i in (0, 1, 29):
                assert got is getattr(source[i], name) or np.array_equal(
                    np.asarray(got), np.asarray(getattr(source[i], name)))
            else:
                assert isinstance(got, Fp8Weight)
                np.testing.assert_array_equal(np.asarray(got.values, np.float32),
                                              np.asarray(getattr(plain[i], name).values,
                                                         np.float32))
    with pytest.raises(ValueError, match="model has 30 layers"):
        quantize_weights(smollm2.params, keep_layers=(30,))


def test_llm_keep_layers_settings():
    base = dict(model="tiny-random", dtype="float32", compilation_cache=False, warmup=False)
    llm = LLM(**base, weights_dtype="fp8", fp8_keep_layers=[-1])
    assert isinstance(llm.model.params.layers[0].w_qkv, Fp8Weight)
    assert not isinstance(llm.model.params.layers[-1].w_qkv, Fp8Weight)
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0,
                                                         ignore_eos=True))[0].token_ids) == 3
    with pytest.raises(ValueError, match="set weights_dtype too"):
        LLM(**base, fp8_keep_layers=[0])
    with pytest.raises(ValueError, match="layer_loop='unrolled'"):
        LLM(**base, weights_dtype="fp8", fp8_keep_layers=[0], layer_loop="scan")


def test_llm_folds_norms_by_scheme():
    """LLM folds the norms into q/k/v and gate/up for MXFP8 and not for per-channel FP8 (whose
    quality it costs) unless asked; asking without FP8 weights is an error."""
    base = dict(model="tiny-random", dtype="float32", compilation_cache=False, warmup=False)

    def folded(**kwargs):
        layer = LLM(**base, layer_loop="unrolled", **kwargs).model.params.layers[0]
        return [getattr(layer, n).input_rms_eps is not None for n in PROJECTIONS]

    assert folded(weights_dtype="fp8") == [True, False, True, False]
    assert folded(weights_dtype="fp8-channel") == [False] * 4
    assert folded(weights_dtype="fp8-channel", fp8_fold_norms=True) == [True, False, True, False]
    assert folded(weights_dtype="mxfp8", fp8_fold_norms=False) == [False] * 4
    with pytest.raises(ValueError, match="fp8_fold_norms applies to FP8 weights"):
        LLM(**base, fp8_fold_norms=True)
