"""StepPlan: everything the host decides for one step, as fixed-shape numpy arrays.

Token layout of a step (static, set by the bucket `StepShape`):

    [ decode block: num_decode rows x 1 token | prefill block: num_prefill rows x max_q_len ]

Row i of the decode block owns token i; prefill row j owns tokens
num_decode + j * max_q_len + [0, q_len). Unused slots are padding. A fixed layout lets the
device find each token's row without searching, and lets attention treat each block as a
dense batch. The plan is packed into one int32 buffer (floats bit-cast), so each step makes a
single host-to-device transfer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.engine.sampling import SamplingBatch
from dendrite_jax.grammar.device_automaton import NO_AUTOMATON


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    num_decode: int  # rows with one query token
    num_prefill: int  # rows with up to max_q_len query tokens
    max_q_len: int  # padded length of a prefill row (1 when num_prefill == 0)
    pages_per_seq: int  # page-table width
    prompt_logprobs: bool = False  # also score every input token against `targets`
    needs_sort: bool = False  # a row uses top-k/top-p/min-p or asks for top logprobs
    burst: int = 1  # decode steps in one launch (decode-only; `EngineConfig.decode_burst`)

    def __post_init__(self) -> None:
        if self.burst > 1 and (self.num_prefill or self.prompt_logprobs):
            raise ValueError(f"a burst of {self.burst} steps is for decode-only shapes without "
                             f"prompt logprobs, not {self}")

    @property
    def num_seqs(self) -> int:
        return self.num_decode + self.num_prefill

    @property
    def num_tokens(self) -> int:
        return self.num_decode + self.num_prefill * self.max_q_len

    def row_start(self, row: int) -> int:
        if row < self.num_decode:
            return row
        return self.num_decode + (row - self.num_decode) * self.max_q_len


_INT_FIELDS = ("input_ids", "targets", "q_lens", "seq_lens", "page_tables", "slot_ids",
               "prompt_lens", "sample", "reset", "automaton_state", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")


def field_sizes(shape: StepShape) -> dict[str, int]:
    t, s = shape.num_tokens, shape.num_seqs
    sizes = {"input_ids": t, "targets": t, "page_tables": s * shape.pages_per_seq}
    for name in _INT_FIELDS + _FLOAT_FIELDS:
        sizes.setdefault(name, s)
    return sizes


@dataclasses.dataclass
class StepPlan:
    """Host arrays for one step, padded to `shape`. Padding rows have q_len 0 and seq_len 0."""

    shape: StepShape
    input_ids: np.ndarray  # [T]
    targets: np.ndarray  # [T] next prompt token per input token, for prompt logprobs
    q_lens: np.ndarray  # [S] query tokens of each row
    seq_lens: np.ndarray  # [S] context length after this step (new tokens included)
    page_tables: np.ndarray  # [S, P]
    slot_ids: np.ndarray  # [S] row -> slot of the device-side per-request state
    prompt_lens: np.ndarray  # [S]
    sample: np.ndarray  # [S] 1 where the row's last token is sampled this step
    reset: np.ndarray  # [S] 1 where the row's request is new to its slot: clear the slot first
    # [S] the row's state in the device automata (`grammar.device_automaton`), or
    # NO_AUTOMATON, or FROM_SLOT (the state its slot's last sample left)
    automaton_state: np.ndarray
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
        sizes = field_sizes(shape)
        arrays = {n: np.zeros(sizes[n], np.int32) for n in _INT_FIELDS}
        arrays.update({n: np.zeros(sizes[n], np.float32) for n in _FLOAT_FIELDS})
        for name in ("top_p", "repetition_penalty"):
            arrays[name][:] = 1.0
        arrays["automaton_state"][:] = NO_AUTOMATON
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
    q_lens: jax.Array
    seq_lens: jax.Array
    page_tables: jax.Array
    slot_ids: jax.Array
    prompt_lens: jax.Array
    sample: jax.Array
    reset: jax.Array
    automaton_state: jax.Array
    sampling: SamplingBatch


def unpack(buffer: jax.Array, shape: StepShape) -> DevicePlan:
    sizes = field_sizes(shape)
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
