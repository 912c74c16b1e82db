"""Decode-shaped matmuls for NVIDIA GPUs with the work around them fused (Pallas, Triton
lowering).

A decode step multiplies a few rows (its batch) by each weight matrix, so the weight's bytes
set the time, and in XLA's program each small elementwise op around a matmul (an RMSNorm, the
SwiGLU product, a residual add) is a kernel of its own costing a few microseconds. One kernel
here streams the weight once and does that work in its prologue and epilogue:

    out = [residual +] epilogue(rms_norm(x) @ w)       (see `reference.decode_matmul`)

- `norm_weight`: RMSNorm of x first. The kernel accumulates (x * norm_weight) @ w and each
  row's sum of squares as it streams the reduction axis, then scales the row by its rsqrt.
- `gate_up`: w is [K, 2F] = [w_gate | w_up]; the output is silu(x @ w_gate) * (x @ w_up).
- `residual`: added to the output (in the residual's dtype).

One program per block of `block_n` output columns streams those columns of the weight over
the reduction axis in `block_k` steps; all rows (at most `MAX_ROWS`) are one block, read with
masked loads. Same Triton lowering as the attention kernels, for the same reason
(`kernels_pallas/paged_attention/gpu.py`): its interpret mode runs these bodies in CI.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_DOT_ROWS = 16  # Triton's tensor-core dot needs M, N, K >= 16
MAX_ROWS = 64  # more rows than this are a prefill's matmul: XLA's GEMMs serve those


@dataclasses.dataclass(frozen=True)
class MatmulTuning:
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def _rows_block(rows: int) -> int:
    return max(MIN_DOT_ROWS, 1 << (rows - 1).bit_length())


def _rows(ref, block_m: int, start, size: int):
    """Rows 0..block_m of columns [start, start + size) of a [rows, cols] ref, and the mask of
    real rows (block_m may run past the array's rows)."""
    mask = jnp.broadcast_to(jnp.arange(block_m)[:, None] < ref.shape[0], (block_m, size))
    return ref.at[pl.ds(0, block_m), pl.ds(start, size)], mask


def _kernel(x_ref, w_ref, *refs, block_m: int, tuning: MatmulTuning, normed: bool,
            gate_up: bool, residual: bool, eps: float):
    refs = list(refs)
    g_ref = refs.pop(0) if normed else None
    r_ref = refs.pop(0) if residual else None
    (o_ref,) = refs
    n, k_block = tuning.block_n, tuning.block_k
    start = pl.multiple_of(pl.program_id(0) * n, n)
    columns = [start] + ([o_ref.shape[1] + start] if gate_up else [])
    precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def body(kb, carry):
        accs, sum_sq = carry
        k0 = pl.multiple_of(kb * k_block, k_block)
        view, mask = _rows(x_ref, block_m, k0, k_block)
        x = pltriton.load(view, mask=mask, other=0)
        if normed:
            x32 = x.astype(jnp.float32)
            sum_sq = sum_sq + jnp.sum(x32 * x32, axis=1)
            x = (x32 * g_ref[pl.ds(k0, k_block)].astype(jnp.float32)[None, :]).astype(x.dtype)
        accs = tuple(acc + pltriton.dot(x, w_ref[pl.ds(k0, k_block), pl.ds(c, n)],
                                        precision=precision)
                     for acc, c in zip(accs, columns, strict=True))
        return accs, sum_sq

    init = (tuple(jnp.zeros((block_m, n), jnp.float32) for _ in columns),
            jnp.zeros((block_m,), jnp.float32))
    accs, sum_sq = lax.fori_loop(0, x_ref.shape[1] // k_block, body, init)
    if normed:
        scale = lax.rsqrt(sum_sq / x_ref.shape[1] + eps)[:, None]
        accs = tuple(acc * scale for acc in accs)
    out = jax.nn.silu(accs[0]) * accs[1] if gate_up else accs[0]
    if residual:
        view, mask = _rows(r_ref, block_m, start, n)
        out = out + pltriton.load(view, mask=mask, other=0).astype(jnp.float32)
    view, mask = _rows(o_ref, block_m, start, n)
    pltriton.store(view, out.astype(o_ref.dtype), mask=mask)


def supports(rows: int, k: int, n_out: int, tuning: MatmulTuning) -> bool:
    """Whether the kernel takes this shape with this tuning."""
    return (rows <= MAX_ROWS and k % tuning.block_k == 0 and n_out % tuning.block_n == 0
            and tuning.block_k >= MIN_DOT_ROWS and tuning.block_n >= MIN_DOT_ROWS)


@functools.partial(jax.jit, static_argnames=("gate_up", "eps", "tuning", "interpret"))
def decode_matmul(x: jax.Array, w: jax.Array, *, norm_weight: jax.Array | None = None,
                  eps: float = 1e-6, gate_up: bool = False, residual: jax.Array | None = None,
                  tuning: MatmulTuning = MatmulTuning(), interpret: bool = False) -> jax.Array:
    """[residual +] epilogue(rms_norm(x) @ w) for x [M, K], w [K, N] (gate_up: [K, 2F])."""
    rows, k = x.shape
    n_out = w.shape[1] // 2 if gate_up else w.shape[1]
    if w.shape[0] != k or not supports(rows, k, n_out, tuning):
        raise ValueError(f"decode_matmul does not take x {x.shape}, w {w.shape} with {tuning} "
                         f"(at most {MAX_ROWS} rows; K and N multiples of the blocks)")
    args = [x, w]
    if norm_weight is not None:
        args.append(norm_weight)
    if residual is not None:
        args.append(residual)
    out_dtype = residual.dtype if residual is not None else x.dtype
    kernel = functools.partial(_kernel, block_m=_rows_block(rows), tuning=tuning,
                               normed=norm_weight is not None, gate_up=gate_up,
                               residual=residual is not None, eps=eps)
    return pl.pallas_call(
        kernel, grid=(n_out // tuning.block_n,),
        out_shape=jax.ShapeDtypeStruct((rows, n_out), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tuning.num_warps,
                                                num_stages=tuning.num_stages),
        interpret=interpret, name="decode_matmul",
    )(*args)
