"""A step's outputs packed into one int32 buffer, so the host makes one device-to-host copy per
step (floats are bit-cast), mirroring the single upload of the `StepPlan`.

Which fields a step returns depends on its `StepShape`: the sampled tokens and their logprobs
always; each row's rank and top logprobs only in the `needs_sort` variant (any request asking
for logprobs selects it); per-token prompt logprobs only in the `prompt_logprobs` variant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.engine.sampling import MAX_LOGPROBS
from dendrite_jax.engine.step_plan import StepShape


@dataclasses.dataclass(frozen=True)
class StepResult:
    """A step's outputs, on the host (fields the step's variant does not compute are None)."""

    tokens: np.ndarray  # [S] sampled next token per row
    logprob: np.ndarray  # [S] raw-model logprob of that token
    rank: np.ndarray | None = None  # [S] 1 = most likely
    top_logprobs: np.ndarray | None = None  # [S, MAX_LOGPROBS]
    top_ids: np.ndarray | None = None  # [S, MAX_LOGPROBS]
    prompt_logprob: np.ndarray | None = None  # [T] logprob of targets[t] after token t
    prompt_rank: np.ndarray | None = None  # [T]
    prompt_top_logprobs: np.ndarray | None = None  # [T, MAX_LOGPROBS]
    prompt_top_ids: np.ndarray | None = None  # [T, MAX_LOGPROBS]


def output_layout(shape: StepShape) -> list[tuple[str, tuple[int, ...], type]]:
    """(field, shape, dtype) of each packed field, in buffer order."""
    s, t = shape.num_seqs, shape.num_tokens
    layout = [("tokens", (s,), np.int32), ("logprob", (s,), np.float32)]
    if shape.needs_sort:
        layout += [("rank", (s,), np.int32), ("top_logprobs", (s, MAX_LOGPROBS), np.float32),
                   ("top_ids", (s, MAX_LOGPROBS), np.int32)]
    if shape.prompt_logprobs:
        layout += [("prompt_logprob", (t,), np.float32), ("prompt_rank", (t,), np.int32),
                   ("prompt_top_logprobs", (t, MAX_LOGPROBS), np.float32),
                   ("prompt_top_ids", (t, MAX_LOGPROBS), np.int32)]
    return layout


def pack(shape: StepShape, fields: dict[str, jax.Array]) -> jax.Array:
    """The fields of `output_layout(shape)` as one flat int32 array."""
    parts = []
    for name, _, dtype in output_layout(shape):
        x = fields[name].ravel()
        parts.append(jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
                     if dtype == np.float32 else x.astype(jnp.int32))
    return jnp.concatenate(parts)


def unpack(shape: StepShape, buffer: np.ndarray) -> StepResult:
    """One step's outputs (of a burst: its first step's)."""
    fields, offset = {}, 0
    for name, field_shape, dtype in output_layout(shape):
        size = int(np.prod(field_shape))
        fields[name] = buffer[offset:offset + size].view(dtype).reshape(field_shape)
        offset += size
    return StepResult(**fields)


def unpack_burst(shape: StepShape, buffer: np.ndarray) -> list[StepResult]:
    """The outputs of each of a launch's `shape.burst` steps, in order (a burst packs its
    steps' buffers one after another)."""
    steps = buffer.reshape(shape.burst, -1)
    return [unpack(shape, s) for s in steps]
