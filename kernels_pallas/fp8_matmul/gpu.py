"""FP8 weight matmul for NVIDIA GPUs: a Pallas kernel (Triton lowering) that streams E4M3 weights.

Decode multiplies a few rows by every weight once, so its time is the weight bytes over the
memory bandwidth: reading FP8 instead of bf16 halves it, provided nothing dequantizes the whole
weight into memory first. The weight is stored output-major ([N, K], `codecs.fp8`). Two kernels:

- One row (`_gemv_kernel`, `Fp8Tuning.gemv`, decode at batch 1): CUDA-core FMAs. Each program
  owns `gemv_block_n` output columns and one of `k_splits` slices of K; each step loads a
  [block_n, gemv_block_k] tile (16 contiguous E4M3 values per thread), multiplies it by the
  row's slice in float32 and reduces it along K (MXFP8: each 32-value group scaled first).
  For a weight with a folded norm (`Fp8Weight.input_rms_eps`) it also sums the squares of the
  row's slices, which it holds anyway, and the output is scaled by 1 / rms(x) after the kernel
  (XLA fuses that into the output's consumer): the norm costs no kernel of its own.
- Several rows (`_kernel`): the tensor cores. Each program owns `block_n` output columns of up
  to `block_m` rows and walks its slice of K in groups of 32 (one MXFP8 scale block): each
  group's weights are converted to the activations' dtype in registers, multiplied, and the
  partial product is scaled by that group's power-of-two scales before it is accumulated
  (per-channel weights: one scale at the end). Rows of x are padded to 16, the tensor cores'
  smallest M. A folded norm's rows are normalised by XLA before the kernel.

Splitting K gives a decode-sized matmul enough programs to keep every SM streaming (4096
output columns are only 32 blocks of 128); the float32 partial sums are added after the kernel.
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

from kernels_pallas.codecs.fp8 import BLOCK, E8M0_BIAS, Fp8Weight
from kernels_pallas.fp8_matmul.reference import rms_normalize
from kernels_pallas.paged_attention.gpu import MIN_DOT_ROWS, dot

TARGET_PROGRAMS = 528  # four per SM of a 132-SM GPU: the fastest programs-per-SM count


@dataclasses.dataclass(frozen=True)
class Fp8Tuning:
    """Block sizes and pipelining; `k_splits=None` splits K until the grid has
    `TARGET_PROGRAMS` programs. The `gemv_*` fields tune the one-row kernel (defaults per
    scheme: `SCHEME_TUNINGS`)."""

    block_n: int = 128  # output columns per program (largest power of 2 <= it dividing N)
    block_k: int = 128  # K rows per loop step (largest of 256/128/64/32 dividing the slice)
    block_m: int = 64  # rows of x per program
    k_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = True  # one-row matmuls on CUDA cores (`_gemv_kernel`): faster at M = 1
    gemv_block_n: int = 32
    gemv_block_k: int = 256
    gemv_warps: int = 4


def _largest_divisor(n: int, options: tuple[int, ...]) -> int:
    for option in options:
        if n % option == 0:
            return option
    raise ValueError(f"{n} is not a multiple of any of {options}")


def _splits(programs: int, k: int, requested: int | None) -> int:
    """`requested`, or K halved until `programs` x splits reaches TARGET_PROGRAMS (slices of
    whole 32-row blocks, at least 4 of them)."""
    splits = requested
    if splits is None:
        splits = 1
        while (programs * splits < TARGET_PROGRAMS and k % (2 * splits * BLOCK) == 0
               and k // (2 * splits) >= 4 * BLOCK):
            splits *= 2
    if k % (splits * BLOCK):
        raise ValueError(f"K={k} does not split into {splits} slices of whole 32-row blocks")
    return splits


def plan(m: int, k: int, n: int, tuning: Fp8Tuning) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, k_splits) for x [m, k] @ w [k, n]; one-row matmuls with
    `tuning.gemv` get the one-row kernel's blocks (block_m 1)."""
    gemv = tuning.gemv and m == 1
    block_m = 1 if gemv else min(tuning.block_m, max(MIN_DOT_ROWS, 1 << (m - 1).bit_length()))
    widest = tuning.gemv_block_n if gemv else tuning.block_n
    block_n = _largest_divisor(n, tuple(b for b in (256, 128, 64, 32, 16) if b <= widest))
    splits = _splits(-(-m // block_m) * (n // block_n), k, tuning.k_splits)
    deepest = tuning.gemv_block_k if gemv else tuning.block_k
    options = tuple(b for b in (512, 256, 128, 64, 32) if b <= deepest)
    return block_m, block_n, _largest_divisor(k // splits, options), splits


def _kernel(x_ref, w_ref, s_ref, o_ref, *, block_k: int, mx: bool):
    rows, block_n = o_ref.shape
    k = w_ref.shape[1]

    def body(i, acc):
        for g in range(block_k // BLOCK):
            start = i * block_k + g * BLOCK
            part = dot(x_ref[:, pl.ds(start, BLOCK)],
                       w_ref[:, pl.ds(start, BLOCK)].astype(x_ref.dtype), trans_b=True)
            if mx:
                exponent = s_ref[:, start // BLOCK].astype(jnp.float32) - E8M0_BIAS
                part = part * jnp.exp2(exponent)[None, :]
            acc += part
        return acc

    acc = lax.fori_loop(0, k // block_k, body, jnp.zeros((rows, block_n), jnp.float32))
    if not mx:
        acc = acc * s_ref[:, 0].astype(jnp.float32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _gemv_kernel(x_ref, w_ref, s_ref, o_ref, *sq_ref, block_k: int, mx: bool):
    """One row of x: conversions and FMAs on [block_n, block_k] tiles, each reduced along K
    into the columns' float32 sums (no tensor-core operand layouts, which a single row
    wastes). With `sq_ref`, also the row's sum of x² over the slice (a folded norm's): from
    the slices of x the product loads anyway."""
    block_n, slice_k = w_ref.shape
    groups = block_k // BLOCK

    def body(i, carry):
        acc, sq = carry
        start = i * block_k
        xs = x_ref[0, pl.ds(start, block_k)].astype(jnp.float32)
        prod = w_ref[:, pl.ds(start, block_k)].astype(jnp.float32) * xs[None, :]
        if sq_ref:  # elementwise: one reduction after the loop, not a barrier per step
            sq += xs * xs
        if not mx:
            return acc + prod.sum(axis=1), sq
        exponent = s_ref[:, pl.ds(i * groups, groups)].astype(jnp.float32) - E8M0_BIAS
        return acc + (prod.reshape(block_n, groups, BLOCK).sum(axis=2)
                      * jnp.exp2(exponent)).sum(axis=1), sq

    acc, sq = lax.fori_loop(0, slice_k // block_k, body,
                            (jnp.zeros((block_n,), jnp.float32),
                             jnp.zeros((block_k,), jnp.float32)))
    if not mx:
        acc = acc * s_ref[:, 0].astype(jnp.float32)
    o_ref[...] = acc[None, :].astype(o_ref.dtype)
    if sq_ref:
        sq_ref[0][...] = jnp.full((1, block_n), sq.sum(), jnp.float32)


# The one-row kernel's best tuning per scheme by geometric mean over the 8B shape's projections:
# MXFP8 32 columns x 256 K values per step with 4 warps;
# per-channel 16 columns with 8 warps.
SCHEME_TUNINGS = {"mxfp8": Fp8Tuning(),
                  "fp8-channel": Fp8Tuning(gemv_block_n=16, gemv_warps=8)}
# When set, what every matmul uses instead (read when a step is traced; benchmarks swap it).
DEFAULT_TUNING: Fp8Tuning | None = None


def resolve_tuning(scheme: str, tuning: Fp8Tuning | None = None) -> Fp8Tuning:
    """`tuning`, else the override `DEFAULT_TUNING`, else the scheme's `SCHEME_TUNINGS`."""
    return tuning or DEFAULT_TUNING or SCHEME_TUNINGS[scheme]


def fp8_matmul(x: jax.Array, w: Fp8Weight, *, tuning: Fp8Tuning | None = None,
               interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, reading the weight as FP8."""
    tuning = resolve_tuning(w.scheme, tuning)
    *lead, k = x.shape
    n = w.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    gemv = tuning.gemv and m == 1
    block_m, block_n, block_k, splits = plan(m, k, n, tuning)
    rows = -(-m // block_m) * block_m
    if rows != m:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    mx = w.scheme == "mxfp8"
    # A folded norm: the one-row kernel sums x² itself; several rows are normalised first (on
    # the tensor-core path, per-row sums of squares in the kernel slow the step down).
    folded = w.input_rms_eps is not None
    if folded and not gemv:
        x2 = rms_normalize(x2, w.input_rms_eps)
    norm = folded and gemv  # the kernel also writes each row's sum of x²
    slice_k = k // splits
    if mx:
        scale_spec = pl.BlockSpec((block_n, slice_k // BLOCK), lambda i, j, s: (j, s))
    else:
        scale_spec = pl.BlockSpec((block_n, 1), lambda i, j, s: (j, 0))
    # Float32 partial sums when there are several, or when the folded norm's 1 / rms(x) still
    # has to scale them (one rounding, at the end).
    out_dtype = x.dtype if splits == 1 and not norm else jnp.float32
    out_spec = pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j))
    out_shape = jax.ShapeDtypeStruct((splits, rows, n), out_dtype)
    outs = pl.pallas_call(
        functools.partial(_gemv_kernel if gemv else _kernel, block_k=block_k, mx=mx),
        grid=(rows // block_m, n // block_n, splits),
        in_specs=[pl.BlockSpec((block_m, slice_k), lambda i, j, s: (i, s)),
                  pl.BlockSpec((block_n, slice_k), lambda i, j, s: (j, s)), scale_spec],
        out_specs=[out_spec] * (1 + norm),
        out_shape=[out_shape, jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)][:1 + norm],
        compiler_params=pltriton.CompilerParams(
            num_warps=tuning.gemv_warps if gemv else tuning.num_warps,
            num_stages=1 if gemv else tuning.num_stages),
        interpret=interpret, name="fp8_matmul",
    )(x2, w.values, w.scales)
    out = outs[0][0] if splits == 1 else outs[0].sum(0)
    if norm:  # every column holds its row's sum of squares over a slice of K
        sum_sq = outs[1][:, :, :1].sum(0)
        out = out * lax.rsqrt(sum_sq / k + w.input_rms_eps)
    return out.astype(x.dtype)[:m].reshape(*lead, n)
