"""StepPlan: everything the host decides for one step, as fixed-shape numpy arrays.

The plan is packed into one int32 buffer (floats bit-cast) so each step makes a single
host-to-device transfer; the jitted step unpacks it with static slices. `StepShape` is the
bucket: the static sizes a compiled step is specialised on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.engine.sampling import SamplingBatch


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    num_tokens: int  # T: query tokens in the step, padded
    num_seqs: int  # S: sequences (rows), padded
    pages_per_seq: int  # P: page-table width
    max_q_len: int  # Q: longest query run of one sequence (1 for pure decode)
    prompt_logprobs: bool = False  # also score every input token against `targets`


# Field name -> (length as a function of the shape, dtype). Order is the packing order.
_INT_FIELDS = ("input_ids", "targets", "cu_q_lens", "seq_lens", "page_tables", "slot_ids",
               "prompt_lens", "sample", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def _field_sizes(shape: StepShape) -> dict[str, int]:
    t, s, p = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
    sizes = {"input_ids": t, "targets": t, "cu_q_lens": s + 1, "page_tables": s * p}
    for name in _INT_FIELDS + _FLOAT_FIELDS:
        sizes.setdefault(name, s)
    return sizes


@dataclasses.dataclass
class StepPlan:
    """Host arrays for one step, padded to `shape`. Rows past the real sequences have
    q_len 0 and seq_len 0; tokens past the real ones are ignored."""

    shape: StepShape
    input_ids: np.ndarray
    targets: np.ndarray  # next prompt token per input token, for prompt logprobs
    cu_q_lens: np.ndarray
    seq_lens: np.ndarray
    page_tables: np.ndarray  # [S, P]
    slot_ids: np.ndarray  # per-row slot in the device-side penalty state
    prompt_lens: np.ndarray
    sample: np.ndarray  # 1 where the row's last token is sampled this step
    top_k: np.ndarray
    seed: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    repetition_penalty: np.ndarray
    presence_penalty: np.ndarray
    frequency_penalty: np.ndarray

    @classmethod
    def empty(cls, shape: StepShape) -> StepPlan:
        sizes = _field_sizes(shape)
        arrays = {n: np.zeros(sizes[n], np.int32) for n in _INT_FIELDS}
        arrays.update({n: np.ones(sizes[n], np.float32) for n in _FLOAT_FIELDS})
        for name in ("temperature", "min_p", "presence_penalty", "frequency_penalty"):
            arrays[name][:] = 0.0
        arrays["page_tables"] = arrays["page_tables"].reshape(shape.num_seqs, shape.pages_per_seq)
        return cls(shape=shape, **arrays)

    def pack(self) -> np.ndarray:
        parts = [np.asarray(getattr(self, n), np.int32).ravel() for n in _INT_FIELDS]
        parts += [np.asarray(getattr(self, n), np.float32).ravel().view(np.int32)
                  for n in _FLOAT_FIELDS]
        return np.concatenate(parts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """The unpacked plan on device."""

    input_ids: jax.Array
    targets: jax.Array
    cu_q_lens: jax.Array
    seq_lens: jax.Array
    page_tables: jax.Array
    slot_ids: jax.Array
    prompt_lens: jax.Array
    sample: jax.Array
    sampling: SamplingBatch


def unpack(buffer: jax.Array, shape: StepShape) -> DevicePlan:
    sizes = _field_sizes(shape)
    fields, offset = {}, 0
    for name in _INT_FIELDS + _FLOAT_FIELDS:
        chunk = buffer[offset:offset + sizes[name]]
        offset += sizes[name]
        if name in _FLOAT_FIELDS:
            chunk = jax.lax.bitcast_convert_type(chunk, jnp.float32)
        fields[name] = chunk
    fields["page_tables"] = fields["page_tables"].reshape(shape.num_seqs, shape.pages_per_seq)
    sampling = SamplingBatch(
        temperature=fields.pop("temperature"), top_k=fields.pop("top_k"),
        top_p=fields.pop("top_p"), min_p=fields.pop("min_p"),
        repetition_penalty=fields.pop("repetition_penalty"),
        presence_penalty=fields.pop("presence_penalty"),
        frequency_penalty=fields.pop("frequency_penalty"),
        seed=jax.lax.bitcast_convert_type(fields.pop("seed"), jnp.uint32))
    return DevicePlan(sampling=sampling, **fields)
