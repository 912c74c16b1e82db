"""StepPlan: everything the host decides for one step, as fixed-shape numpy arrays.

A step is a flat axis of `num_tokens` tokens plus per-sequence arrays of `num_seqs` rows (see
`kernels_pallas.paged_attention.ragged`): row r owns the `q_lens[r]` tokens after those of the
rows before it. Decode rows come first, then prefill chunks; nothing is padded per row, and
rows and tokens past the last used one are padding (q_len 0, seq_len 0).

Each field is declared once, in `FIELDS` (name, dtype, extent, default, meaning): the plan's
arrays, its packing into one int32 buffer (floats bit-cast, so each step makes a single
host-to-device transfer), the device-side unpacking and the sampling columns a request
contributes (`SAMPLING_FIELDS`) all come from that declaration.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.engine.sampling import SamplingBatch
from dendrite_jax.grammar.device_automaton import NO_AUTOMATON


@dataclasses.dataclass(frozen=True, order=True)
class StepShape:
    """The static shape of a step program: one compiled executable per distinct value."""

    num_tokens: int  # T: the flat token axis
    num_seqs: int  # R: per-sequence rows (min(max_num_seqs, T); T when decode_only)
    pages_per_seq: int  # page-table width (always the engine's full width)
    decode_only: bool = False  # every row has at most one token, and token r is row r's
    prompt_logprobs: bool = False  # also score every input token against `targets`
    needs_sort: bool = False  # a row uses top-k/top-p/min-p or asks for top logprobs
    burst: int = 1  # decode steps in one launch (decode-only; `EngineConfig.decode_burst`)

    def __post_init__(self) -> None:
        if self.burst > 1 and not (self.decode_only and not self.prompt_logprobs):
            raise ValueError(f"a burst of {self.burst} steps is for decode-only shapes without "
                             f"prompt logprobs, not {self}")
        if self.decode_only and self.num_tokens != self.num_seqs:
            raise ValueError(f"a decode-only step has one token per row, not {self}")
        if self.num_seqs > self.num_tokens:
            raise ValueError(f"a step has at most one row per token, not {self}")


@dataclasses.dataclass(frozen=True)
class PlanField:
    """One array of the plan: [T] per token, [R] per row, or [R, P] per row's page table."""

    name: str
    dtype: type  # np.int32 or np.float32
    extent: str  # "token", "row" or "page_table"
    default: float
    doc: str
    # For a sampling field: how a request's column value is read from (params, seed).
    sampling: Any = None


def _seed_bits(seed: int) -> int:
    return int(np.uint32(seed).view(np.int32))


FIELDS: tuple[PlanField, ...] = (
    PlanField("input_ids", np.int32, "token", 0,
              "the token ids; FROM_LAST_TOKEN: the slot's last sample, read on device"),
    PlanField("targets", np.int32, "token", 0,
              "next prompt token per input token, for prompt logprobs"),
    PlanField("q_lens", np.int32, "row", 0, "query tokens of each row"),
    PlanField("seq_lens", np.int32, "row", 0, "context length after this step (new tokens "
              "included)"),
    PlanField("page_tables", np.int32, "page_table", 0, "each row's KV pages"),
    PlanField("slot_ids", np.int32, "row", 0, "row -> slot of the device-side request state"),
    PlanField("prompt_lens", np.int32, "row", 0, "the row's prompt length"),
    PlanField("sample", np.int32, "row", 0, "1 where the row's last token is sampled"),
    PlanField("reset", np.int32, "row", 0,
              "1 where the row's request is new to its slot: clear the slot first"),
    PlanField("automaton_state", np.int32, "row", NO_AUTOMATON,
              "the row's device-automaton state, NO_AUTOMATON or FROM_SLOT"),
    PlanField("top_k", np.int32, "row", 0, "top-k (<= 0: off)",
              sampling=lambda p, seed: min(p.top_k, np.iinfo(np.int32).max)),
    PlanField("seed", np.int32, "row", 0, "the request's seed (uint32 bits)",
              sampling=lambda p, seed: _seed_bits(seed)),
    PlanField("temperature", np.float32, "row", 0.0, "0: greedy",
              sampling=lambda p, seed: p.temperature),
    PlanField("top_p", np.float32, "row", 1.0, "top-p (1: off)",
              sampling=lambda p, seed: p.top_p),
    PlanField("min_p", np.float32, "row", 0.0, "min-p (0: off)",
              sampling=lambda p, seed: p.min_p),
    PlanField("repetition_penalty", np.float32, "row", 1.0, "1: off",
              sampling=lambda p, seed: p.repetition_penalty),
    PlanField("presence_penalty", np.float32, "row", 0.0, "0: off",
              sampling=lambda p, seed: p.presence_penalty),
    PlanField("frequency_penalty", np.float32, "row", 0.0, "0: off",
              sampling=lambda p, seed: p.frequency_penalty),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
SAMPLING_FIELDS = tuple(f for f in FIELDS if f.sampling is not None)


def sampling_columns(params, seed: int) -> tuple[float, ...]:
    """A request's values of `SAMPLING_FIELDS`, in order (computed once per request)."""
    return tuple(f.sampling(params, seed) for f in SAMPLING_FIELDS)


def field_shape(field: PlanField, shape: StepShape) -> tuple[int, ...]:
    return {"token": (shape.num_tokens,), "row": (shape.num_seqs,),
            "page_table": (shape.num_seqs, shape.pages_per_seq)}[field.extent]


def buffer_size(shape: StepShape) -> int:
    """int32 words of a packed plan."""
    return sum(int(np.prod(field_shape(f, shape))) for f in FIELDS)


class StepPlan:
    """Host arrays for one step, shaped by `shape`; one attribute per entry of `FIELDS`, and
    the device logit-bias table the step reads (`engine.logit_bias`; None: the runner's)."""

    def __init__(self, shape: StepShape, arrays: dict[str, np.ndarray]) -> None:
        self.shape = shape
        self.logit_bias: Any = None
        self.__dict__.update(arrays)

    @classmethod
    def empty(cls, shape: StepShape) -> StepPlan:
        return cls(shape, {f.name: np.full(field_shape(f, shape), f.default, f.dtype)
                           for f in FIELDS})

    def row_starts(self) -> np.ndarray:
        """Each row's first token on the flat axis (cu_q_lens[:-1])."""
        q_lens = np.asarray(self.q_lens)
        return np.cumsum(q_lens) - q_lens

    def fill_rows(self, rows: int, columns: dict[str, list]) -> None:
        """Set rows [0, rows) of each named per-row field."""
        for name, values in columns.items():
            getattr(self, name)[:rows] = values

    def pack(self) -> np.ndarray:
        return np.concatenate([np.asarray(getattr(self, f.name), f.dtype).ravel().view(np.int32)
                               for f in FIELDS])


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
    fields, offset = {}, 0
    for f in FIELDS:
        dims = field_shape(f, shape)
        size = int(np.prod(dims))
        chunk = buffer[offset:offset + size].reshape(dims)
        offset += size
        if f.dtype == np.float32:
            chunk = jax.lax.bitcast_convert_type(chunk, jnp.float32)
        fields[f.name] = chunk
    sampling = {f.name: fields.pop(f.name) for f in SAMPLING_FIELDS}
    sampling["seed"] = jax.lax.bitcast_convert_type(sampling["seed"], jnp.uint32)
    return DevicePlan(sampling=SamplingBatch(**sampling), **fields)
