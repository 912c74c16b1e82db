"""FP8 weight matmul for NVIDIA GPUs: a Pallas kernel (Triton lowering) that streams E4M3 weights.

Decode multiplies a few rows by every weight once, so its time is the weight bytes over the
memory bandwidth: reading FP8 instead of bf16 halves it, provided nothing dequantizes the whole
weight into memory first. One program per block of `block_n` output columns walks K in groups
of 32 rows (one MXFP8 scale block): each group's weights are converted to the activations'
dtype in registers, multiplied on the tensor cores, and the partial product is scaled by that
group's power-of-two scale row before it is accumulated (per-channel weights: one scale at the
end). Rows of x are padded to 16, the tensor cores' smallest M.

Triton lowering for the same reason as the attention kernels: its kernels run under Pallas'
interpret mode in the CPU tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dendrite_jax.quant.fp8 import BLOCK, E8M0_BIAS, Fp8Weight
from kernels_pallas.paged_attention.gpu import MIN_DOT_ROWS, dot


@dataclasses.dataclass(frozen=True)
class Fp8Tuning:
    """Untuned defaults (no GPU has timed this kernel yet)."""

    block_n: int = 128  # output columns per program (largest of 128/64/32/16 dividing N)
    block_k: int = 128  # K rows per loop step (largest of 128/64/32 dividing K)
    block_m: int = 64  # rows of x per program
    num_warps: int = 4
    num_stages: int = 3


def _largest_divisor(n: int, options: tuple[int, ...]) -> int:
    for option in options:
        if n % option == 0:
            return option
    raise ValueError(f"{n} is not a multiple of any of {options}")


def _kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, mx: bool):
    rows, block_n = o_ref.shape
    k = w_ref.shape[0]

    def body(i, acc):
        for g in range(block_k // BLOCK):
            start = i * block_k + g * BLOCK
            part = dot(x_ref[:, pl.ds(start, BLOCK)],
                       w_ref[pl.ds(start, BLOCK), :].astype(x_ref.dtype))
            if mx:
                exponent = s_ref[start // BLOCK, :].astype(jnp.float32) - E8M0_BIAS
                part = part * jnp.exp2(exponent)[None, :]
            acc += part
        return acc

    acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((rows, block_n), jnp.float32))
    if not mx:
        acc = acc * s_ref[0, :].astype(jnp.float32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def fp8_matmul(x: jax.Array, w: Fp8Weight, *, tuning: Fp8Tuning = Fp8Tuning(),
               interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, reading the weight as FP8."""
    *lead, k = x.shape
    n = w.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    block_m = min(tuning.block_m, max(MIN_DOT_ROWS, 1 << (m - 1).bit_length()))
    rows = -(-m // block_m) * block_m
    if rows != m:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    block_n = _largest_divisor(n, tuple(b for b in (128, 64, 32, 16) if b <= tuning.block_n))
    block_k = _largest_divisor(k, tuple(b for b in (128, 64, 32) if b <= tuning.block_k))
    mx = w.scheme == "mxfp8"
    scale_rows = w.scales.shape[-2]
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, mx=mx),
        grid=(rows // block_m, n // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((k, block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((scale_rows, block_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=tuning.num_stages),
        interpret=interpret, name="fp8_matmul",
    )(x2, w.values, w.scales)
    return out[:m].reshape(*lead, n)
