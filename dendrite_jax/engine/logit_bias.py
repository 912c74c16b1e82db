"""Logit bias (OpenAI's `logit_bias`): per-request additive biases on chosen token ids.

Each slot holds up to MAX_LOGIT_BIAS (token id, bias) pairs in a small device table the steps
read beside the slots' state; a row's pairs are added to its logits before penalties, the token
mask and sampling (the returned logprobs stay the raw model's). The table changes only when a
request with a bias takes a slot, or a slot that held one is reused: the host keeps a copy and
uploads it whole then, and each step's plan carries the table it was planned with, so a step
launched later still reads the biases of the requests it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGIT_BIAS = 300  # token ids a request may bias (OpenAI's limit)
MAX_BIAS = 100.0  # |bias| at most this (OpenAI's range)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogitBias:
    """Per-slot biases: ids [S, K] int32 (the vocabulary size for an unused entry, which the
    scatter drops) and values [S, K] float32."""

    ids: jax.Array
    values: jax.Array


def apply_logit_bias(logits: jax.Array, bias: LogitBias, slot_ids: jax.Array) -> jax.Array:
    """`logits` [R, V] plus each row's slot's biases."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, bias.ids[slot_ids]].add(bias.values[slot_ids], mode="drop")


class LogitBiasTable:
    """The host's copy of the slots' biases and the device table made from it. Invariant:
    `_biased` is the set of slots whose host rows hold any pair, and the device table equals
    the host rows whenever `_dirty` is False."""

    def __init__(self, num_slots: int, vocab_size: int,
                 place: Callable[[LogitBias], LogitBias]) -> None:
        self.vocab_size = vocab_size
        self._ids = np.full((num_slots, MAX_LOGIT_BIAS), vocab_size, np.int32)
        self._values = np.zeros((num_slots, MAX_LOGIT_BIAS), np.float32)
        self._place = place
        self._biased: set[int] = set()
        self._device = place(LogitBias(self._ids.copy(), self._values.copy()))
        self._dirty = False

    def assign(self, slot: int, bias: Mapping[int, float] | None) -> None:
        """The biases of the request newly placed in `slot` (None or empty: none)."""
        if not bias and slot not in self._biased:
            return
        self._ids[slot] = self.vocab_size
        self._values[slot] = 0.0
        if bias:
            items = list(bias.items())
            self._ids[slot, :len(items)] = [t for t, _ in items]
            self._values[slot, :len(items)] = [v for _, v in items]
            self._biased.add(slot)
        else:
            self._biased.discard(slot)
        self._dirty = True

    def device(self) -> LogitBias:
        """The device table as the host's copy now stands."""
        if self._dirty:
            self._device = self._place(LogitBias(self._ids.copy(), self._values.copy()))
            self._dirty = False
        return self._device
