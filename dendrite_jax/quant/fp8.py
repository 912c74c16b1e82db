"""FP8 weights for the model: its params' projections converted to `Fp8Weight`s (the format:
`kernels_pallas.codecs.fp8`), MXFP8 or per-channel FP8 E4M3.

Folded norms: `quantize_weights(..., rms_norm_eps=eps)` multiplies the weights of q/k/v and
gate/up by the weight of the RMS norm before them (row k of the weight by the norm's weight k),
and marks them `input_rms_eps`: their matmul then takes the residual stream x itself and scales
its output by 1 / rms(x), which is the same product (x / rms(x) * g) @ w = (x @ (g * w)) /
rms(x). On a GPU the one-row kernel sums x² from the slices of x it loads anyway and XLA fuses
the scaling into the kernel that reads its output, so at batch 1 a norm costs no kernels of its
own (unfolded, a norm is a reduction kernel and a scaling kernel, twice per layer). For MXFP8
it also helps quality (the blocks of 32 take the norm's per-channel gains into their scales);
per-channel scales span all of K and lose precision to folded outlier gains, so folding costs
them quality. `FOLD_NORMS` is `LLM`'s default per scheme.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from dendrite_jax.model.params import with_layer_loop
from kernels_pallas.codecs.fp8 import SCHEMES, Fp8Weight, quantize


def weight_scheme(weights_dtype: str) -> str:
    """The scheme a `weights_dtype` setting names ("fp8" is MXFP8)."""
    scheme = "mxfp8" if weights_dtype == "fp8" else weights_dtype
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weights_dtype {weights_dtype!r}; choose from "
                         f"{('fp8', *SCHEMES)}")
    return scheme


PROJECTIONS = ("w_qkv", "w_o", "w_gate_up", "w_down")  # what `quantize_weights` converts
# Whether `LLM` folds the norms by default, per scheme (module doc; benchmarks/README.md).
FOLD_NORMS = {"mxfp8": True, "fp8-channel": False}


def multiplied_by(params, matmul: str) -> bool:
    """Whether any weight in `params` is an `Fp8Weight` that the `matmul` backend multiplies."""
    return any(isinstance(w, Fp8Weight) and w.matmul == matmul for w in
               jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight)))


def quantize_weights(params, scheme: str = "mxfp8", matmul: str = "reference",
                     keep_layers: Sequence[int] = (), rms_norm_eps: float | None = None):
    """Params with every layer's projections (q/k/v, o, gate/up, down) as `Fp8Weight`s that
    `matmul` multiplies (a resolved `kernels_pallas.fp8_matmul` backend); norms, embeddings and
    the LM head stay in their dtype (the head's error would land directly on the logits).
    With `rms_norm_eps` (the model's), the attention and MLP norms' weights are folded into
    q/k/v and gate/up, which then normalise their input themselves (module doc).
    Layers in `keep_layers` (indices; negative count from the end) stay unquantized: the first
    and last layers are the most sensitive. Works on stacked and per-layer `layers`; with
    `keep_layers` the result is per-layer (a stack cannot mix FP8 and plain weights)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown FP8 scheme {scheme!r}; choose from {SCHEMES}")
    first = params.layers if not isinstance(params.layers, tuple) else params.layers[0]
    if first.router is not None:
        raise ValueError("FP8 weights for mixture-of-experts layers are not supported yet")
    folded = {"w_qkv": "attn_norm", "w_gate_up": "mlp_norm"} if rms_norm_eps is not None else {}

    def weight(layer, name):
        w = getattr(layer, name)
        if name not in folded:
            return quantize(w, scheme)
        return dataclasses.replace(quantize(w, scheme, getattr(layer, folded[name])),
                                   input_rms_eps=float(rms_norm_eps))

    def convert(layer):
        return dataclasses.replace(layer, **{
            name: dataclasses.replace(weight(layer, name), matmul=matmul)
            for name in PROJECTIONS})

    layers = params.layers
    if not keep_layers:
        layers = (tuple(convert(lp) for lp in layers) if isinstance(layers, tuple)
                  else convert(layers))
        return dataclasses.replace(params, layers=layers)
    if not isinstance(layers, tuple):
        layers = with_layer_loop(params, "unrolled").layers
    count = len(layers)
    keep = set()
    for i in keep_layers:
        if not -count <= i < count:
            raise ValueError(f"keep_layers has {i}, but the model has {count} layers")
        keep.add(i % count)
    layers = tuple(lp if i in keep else convert(lp) for i, lp in enumerate(layers))
    return dataclasses.replace(params, layers=layers)
