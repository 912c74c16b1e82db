"""The FP8 weight format: MXFP8 (OCP Microscaling) and per-channel FP8 E4M3, with their reference
encode (`quantize`) and decode (`dequantize`).

A quantized weight is an `Fp8Weight` standing for a weight `[..., K, N]` (K the reduction axis,
as every projection is `x @ w`): E4M3 values stored output-major, `[..., N, K]` (each output
column's K weights contiguous, as checkpoints store linear layers), plus scales, a small pytree
that `dendrite_jax.model.linear.linear` multiplies by (with the `kernels_pallas.fp8_matmul` backend it
names); the model's functions take it wherever they take a weight, so quantized params are the
same model, not a parallel one. Output-major because decode reads every weight once for one or
a few rows: a one-row kernel then loads 16 contiguous E4M3 values of one column per thread and
reduces along K, which streams the weights faster than the [K, N] layout and so speeds up the
batch-1 decode step. Schemes:

- "mxfp8" (OCP Microscaling v1.0): blocks of 32 consecutive elements along K share one E8M0
  scale, a power of two stored as a biased exponent in uint8 (`scales [..., N, K / 32]`).
- "fp8-channel": one float32 scale per output column (`scales [..., N, 1]`), amax / 448.

Folded norms: a weight marked `input_rms_eps` has an RMS norm's weight folded into its rows
(`quantize(..., row_scale=g)`): its matmul takes the residual stream x itself and scales its
output by 1 / rms(x), the same product (x / rms(x) * g) @ w = (x @ (g * w)) / rms(x)
(`dendrite_jax.quant.fp8.quantize_weights` folds the model's norms).

Rounding rule (MXFP8): the block's exponent is the smallest e with max|block| / 2^e <= 448, and
elements round to nearest even in E4M3. The spec's example rule, e = floor(log2 max|block|) - 8,
maps the block maximum into [256, 512) and must clip everything above 448: up to 12.5% off the
block's largest element, the one that matters most. The rule here never clips; it differs only
when the maximum's mantissa exceeds 1.75, and then costs one exponent step of range for the
block's smallest elements (E4M3's relative precision is the same across its normal range).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

SCHEMES = ("mxfp8", "fp8-channel")
BLOCK = 32  # MX block size along the reduction axis
E4M3_MAX = 448.0
E8M0_BIAS = 127


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A weight [..., K, N] as E4M3 `values` [..., N, K] (output-major) and `scales` (see the
    module doc)."""

    values: jax.Array
    scales: jax.Array
    scheme: str = "mxfp8"
    matmul: str = "reference"  # how `dendrite_jax.model.linear` multiplies it (`fp8_matmul`)
    # Set when an RMS norm's weight is folded into the values: the matmul normalises x by its
    # root mean square (with this epsilon) itself, x / rms(x) @ w (module doc).
    input_rms_eps: float | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it stands for, [..., K, N]."""
        *lead, n, k = self.values.shape
        return (*lead, k, n)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes


jax.tree_util.register_dataclass(Fp8Weight, data_fields=["values", "scales"],
                                 meta_fields=["scheme", "matmul", "input_rms_eps"])


def _block_exponent(amax: jax.Array) -> jax.Array:
    """Smallest integer e with amax / 2^e <= 448, clamped to E8M0's range."""
    mantissa, exponent = jnp.frexp(amax / E4M3_MAX)  # amax/448 = mantissa * 2^exponent
    e = jnp.where(mantissa > 0.5, exponent, exponent - 1)  # exact powers of two need no step
    return jnp.clip(jnp.where(amax > 0, e, -E8M0_BIAS), -E8M0_BIAS, E8M0_BIAS)


def quantize(w: jax.Array, scheme: str = "mxfp8",
             row_scale: jax.Array | None = None) -> Fp8Weight:
    """Quantize a weight [..., K, N] (K, the reduction axis, a multiple of 32 for mxfp8), with
    its rows first multiplied by `row_scale` [..., K] if given (a folded norm's weight).
    A stack of matrices is quantized one matrix at a time: float32 temporaries of a whole
    stack (14 GiB for the 8B shape's gate/up) would not fit beside the model on an 80 GB GPU.
    Each matrix is one compiled call (a `lax.map` over the stack runs op by op, far slower)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown FP8 scheme {scheme!r}; choose from {SCHEMES}")
    k = jnp.shape(w)[-2]
    if scheme == "mxfp8" and k % BLOCK:
        raise ValueError(f"mxfp8 needs the reduction axis to be a multiple of {BLOCK}, "
                         f"got a weight of shape {tuple(jnp.shape(w)[-2:])}")
    if jnp.ndim(w) == 2:
        return _quantize_matrix(w, scheme, row_scale)
    lead = jnp.shape(w)[:-2]
    w = jnp.reshape(w, (-1, *jnp.shape(w)[-2:]))
    if row_scale is not None:
        row_scale = jnp.reshape(row_scale, (-1, k))
    parts = [_quantize_matrix(w[i], scheme, None if row_scale is None else row_scale[i])
             for i in range(w.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *parts)


@functools.partial(jax.jit, static_argnames="scheme")
def _quantize_matrix(w: jax.Array, scheme: str, row_scale: jax.Array | None) -> Fp8Weight:
    if row_scale is not None:
        w = jnp.asarray(row_scale, jnp.float32)[:, None] * jnp.asarray(w, jnp.float32)
    w = jnp.asarray(w, jnp.float32).T  # [N, K]: output-major
    if scheme == "mxfp8":
        n, k = w.shape
        blocks = w.reshape(n, k // BLOCK, BLOCK)
        e = _block_exponent(jnp.max(jnp.abs(blocks), axis=-1))  # [N, K/32]
        values = blocks * jnp.exp2(-e.astype(jnp.float32))[..., None]
        return Fp8Weight(values.reshape(w.shape).astype(jnp.float8_e4m3fn),
                         (e + E8M0_BIAS).astype(jnp.uint8), scheme)
    amax = jnp.max(jnp.abs(w), axis=-1, keepdims=True)
    scales = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    return Fp8Weight((w / scales).astype(jnp.float8_e4m3fn), scales, scheme)


def dequantize_stored(w: Fp8Weight, dtype=jnp.float32) -> jax.Array:
    """The weight the values and scales stand for, as stored: output-major [..., N, K]."""
    values = w.values.astype(jnp.float32)
    if w.scheme == "mxfp8":
        *lead, n, k = values.shape
        scales = jnp.exp2(w.scales.astype(jnp.float32) - E8M0_BIAS)[..., None]
        blocks = values.reshape(*lead, n, k // BLOCK, BLOCK) * scales
        return blocks.reshape(values.shape).astype(dtype)
    return (values * w.scales).astype(dtype)


def dequantize(w: Fp8Weight, dtype=jnp.float32) -> jax.Array:
    """The weight the values and scales stand for, [..., K, N] in `dtype`."""
    return jnp.swapaxes(dequantize_stored(w, dtype), -1, -2)
