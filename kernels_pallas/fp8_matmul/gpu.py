"""FP8 weight matmul for NVIDIA GPUs: a Pallas kernel (Triton lowering) that streams E4M3 weights.

Decode multiplies a few rows by every weight once, so its time is the weight bytes over the
memory bandwidth: reading FP8 instead of bf16 halves it, provided nothing dequantizes the whole
weight into memory first. Each program owns `block_n` output columns and one of `k_splits`
slices of K, and walks its slice in groups of 32 rows (one MXFP8 scale block): each group's
weights are converted to the activations' dtype in registers, multiplied on the tensor cores,
and the partial product is scaled by that group's power-of-two scale row before it is
accumulated (per-channel weights: one scale at the end). Splitting K gives a decode-sized matmul
enough programs to keep every SM streaming (4096 output columns are only 32 blocks of 128); the
float32 partial sums (a few rows each) are added after the kernel. Rows of x are padded to 16,
the tensor cores' smallest M.

The weights stay in E4M3 and the activations in bf16 (weight-only FP8): at decode the tensor
cores are idle either way, and FP8 activations would add their own rounding error. Triton
lowering for the same reason as the attention kernels: its kernels run under Pallas' interpret
mode in the CPU tests.
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

TARGET_PROGRAMS = 528  # four per SM on an H100 (132 SMs): the best of the sweep in NOTES.md


@dataclasses.dataclass(frozen=True)
class Fp8Tuning:
    """Block sizes and pipelining; `k_splits=None` splits K until the grid has
    `TARGET_PROGRAMS` programs."""

    block_n: int = 128  # output columns per program (largest power of 2 <= it dividing N)
    block_k: int = 128  # K rows per loop step (largest of 256/128/64/32 dividing the slice)
    block_m: int = 64  # rows of x per program
    k_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = True  # one-row matmuls on CUDA cores (`_gemv_kernel`): faster at M = 1
    gemv_block_k: int = 64  # the one-row kernel's K rows per step (its accumulator's size)


def _largest_divisor(n: int, options: tuple[int, ...]) -> int:
    for option in options:
        if n % option == 0:
            return option
    raise ValueError(f"{n} is not a multiple of any of {options}")


def plan(m: int, k: int, n: int, tuning: Fp8Tuning) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, k_splits) for x [m, k] @ w [k, n]."""
    block_m = min(tuning.block_m, max(MIN_DOT_ROWS, 1 << (m - 1).bit_length()))
    block_n = _largest_divisor(n, tuple(b for b in (256, 128, 64, 32, 16)
                                        if b <= tuning.block_n))
    splits = tuning.k_splits
    if splits is None:
        programs = -(-m // block_m) * (n // block_n)
        splits = 1
        while (programs * splits < TARGET_PROGRAMS and k % (2 * splits * BLOCK) == 0
               and k // (2 * splits) >= 4 * BLOCK):
            splits *= 2
    if k % (splits * BLOCK):
        raise ValueError(f"K={k} does not split into {splits} slices of whole 32-row blocks")
    options = tuple(b for b in (256, 128, 64, 32) if b <= tuning.block_k)
    return block_m, block_n, _largest_divisor(k // splits, options), splits


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


def _gemv_kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, mx: bool):
    """One row of x: the loop is conversions and FMAs into an accumulator shaped like the
    weight tiles, reduced once at the end (no tensor-core operand layouts, which a single row
    wastes). Two forms, each the faster for its scheme on an H100 (NOTES.md): MXFP8 views
    each [block_k, block_n] tile as [groups, 32, block_n] to scale the 32-row groups in one
    product; per-channel FP8, with nothing to scale in the loop, multiplies 32-row tiles one
    at a time into a [32, block_n] accumulator (the reshape cost it a quarter of its speed)."""
    block_n = o_ref.shape[-1]
    groups = block_k // BLOCK

    def body_mx(i, acc):
        start = i * block_k
        tile = w_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        xs = x_ref[0, pl.ds(start, block_k)].astype(jnp.float32)
        prod = tile.reshape(groups, BLOCK, block_n) * xs.reshape(groups, BLOCK, 1)
        exponent = s_ref[pl.ds(i * groups, groups), :].astype(jnp.float32) - E8M0_BIAS
        return acc + prod * jnp.exp2(exponent)[:, None, :]

    def body_channel(i, acc):
        for j in range(groups):
            start = i * block_k + j * BLOCK
            tile = w_ref[pl.ds(start, BLOCK), :].astype(jnp.float32)
            acc = acc + tile * x_ref[0, pl.ds(start, BLOCK)].astype(jnp.float32)[:, None]
        return acc

    steps = w_ref.shape[0] // block_k
    if mx:
        acc = lax.fori_loop(0, steps, body_mx, jnp.zeros((groups, BLOCK, block_n), jnp.float32))
        out = acc.sum(axis=0).sum(axis=0)
    else:
        acc = lax.fori_loop(0, steps, body_channel, jnp.zeros((BLOCK, block_n), jnp.float32))
        out = acc.sum(axis=0) * s_ref[0, :].astype(jnp.float32)
    o_ref[...] = out[None, :].astype(o_ref.dtype)


# What the model's matmuls use (read when a step is traced; benchmarks swap it to compare).
DEFAULT_TUNING = Fp8Tuning()


def fp8_matmul(x: jax.Array, w: Fp8Weight, *, tuning: Fp8Tuning | None = None,
               interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, reading the weight as FP8."""
    tuning = tuning or DEFAULT_TUNING
    *lead, k = x.shape
    n = w.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    gemv = tuning.gemv and m == 1
    block_m, block_n, block_k, splits = plan(m, k, n, tuning)
    if gemv:
        block_m = 1
        block_k = min(block_k, tuning.gemv_block_k)  # the accumulator is a whole tile
    rows = -(-m // block_m) * block_m
    if rows != m:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    mx = w.scheme == "mxfp8"
    slice_k = k // splits
    scale_rows = slice_k // BLOCK if mx else 1
    out_dtype = x.dtype if splits == 1 else jnp.float32
    out = pl.pallas_call(
        functools.partial(_gemv_kernel if gemv else _kernel, block_k=block_k, mx=mx),
        grid=(rows // block_m, n // block_n, splits),
        in_specs=[pl.BlockSpec((block_m, slice_k), lambda i, j, s: (i, s)),
                  pl.BlockSpec((slice_k, block_n), lambda i, j, s: (s, j)),
                  pl.BlockSpec((scale_rows, block_n),
                               (lambda i, j, s: (s, j)) if mx else (lambda i, j, s: (0, j)))],
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=tuning.num_stages),
        interpret=interpret, name="fp8_matmul",
    )(x2, w.values, w.scales)
    out = out[0] if splits == 1 else out.sum(0).astype(x.dtype)
    return out[:m].reshape(*lead, n)
