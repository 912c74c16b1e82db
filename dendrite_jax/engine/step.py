"""The compiled step: `step(params, kv, penalties, plan) -> (StepOutput, kv, penalties)`.

Pure: writes this step's K/V into pages, runs the decoder over a ragged mix of prefill
chunks and decode tokens, samples one token per row and computes logprobs. The KV cache and
the penalty state are donated by the caller so XLA updates them in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dendrite_jax.cache.kv import AttentionMetadata, KVCache
from dendrite_jax.config import ModelConfig
from dendrite_jax.engine.sampling import apply_penalties, sample, top_logprobs
from dendrite_jax.engine.step_plan import DevicePlan, StepShape, unpack
from dendrite_jax.model.llama import compute_logits, forward
from dendrite_jax.model.params import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    """Per-slot token statistics for repetition/presence/frequency penalties, kept on device."""

    prompt_mask: jax.Array  # [num_slots, V] bool: token occurs in the prompt
    output_counts: jax.Array  # [num_slots, V] int32: times generated so far

    @classmethod
    def create(cls, num_slots: int, vocab_size: int) -> PenaltyState:
        return cls(prompt_mask=jnp.zeros((num_slots, vocab_size), bool),
                   output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutput:
    tokens: jax.Array  # [S] sampled next token per row
    logprob: jax.Array  # [S] raw-model logprob of that token
    rank: jax.Array  # [S]
    top_logprobs: jax.Array  # [S, MAX_LOGPROBS]
    top_ids: jax.Array  # [S, MAX_LOGPROBS]
    prompt_logprob: jax.Array | None = None  # [T] logprob of targets[t] after token t
    prompt_rank: jax.Array | None = None  # [T]
    prompt_top_logprobs: jax.Array | None = None  # [T, MAX_LOGPROBS]
    prompt_top_ids: jax.Array | None = None  # [T, MAX_LOGPROBS]


def step(params: Params, kv: KVCache, penalties: PenaltyState, plan_buffer: jax.Array, *,
         cfg: ModelConfig, shape: StepShape,
         attention_backend: str) -> tuple[StepOutput, KVCache, PenaltyState]:
    plan = unpack(plan_buffer, shape)
    meta = AttentionMetadata.build(plan.cu_q_lens, plan.seq_lens, plan.page_tables,
                                   shape.num_tokens, kv.page_size, kv.num_pages)
    hidden, kv = forward(params, kv, plan.input_ids, meta, cfg, max_q_len=shape.max_q_len,
                         attention_backend=attention_backend)

    with jax.named_scope("penalty_state"):
        penalties = _record_prompt_tokens(penalties, plan, meta)

    with jax.named_scope("sampling"):
        last_token = jnp.maximum(plan.cu_q_lens[1:] - 1, 0)
        logits = compute_logits(params, hidden[last_token])  # [S, V] float32
        raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
        rows_prompt = penalties.prompt_mask[plan.slot_ids]
        rows_counts = penalties.output_counts[plan.slot_ids]
        b = plan.sampling
        any_penalty = jnp.any((b.repetition_penalty != 1) | (b.presence_penalty != 0)
                              | (b.frequency_penalty != 0))
        logits = jax.lax.cond(any_penalty, lambda x: apply_penalties(x, rows_prompt, rows_counts, b),
                              lambda x: x, logits)
        # The sampled token will sit at position seq_len: noise depends on (seed, position).
        tokens = sample(logits, b, plan.seq_lens)
        counted = jnp.where(plan.sample > 0, plan.slot_ids, penalties.output_counts.shape[0])
        penalties = dataclasses.replace(
            penalties,
            output_counts=penalties.output_counts.at[counted, tokens].add(1, mode="drop"))
        logprob, rank, top_lp, top_ids = top_logprobs(raw_logprobs, tokens)
    out = StepOutput(tokens=tokens, logprob=logprob, rank=rank, top_logprobs=top_lp,
                     top_ids=top_ids)

    if shape.prompt_logprobs:
        with jax.named_scope("prompt_logprobs"):
            all_logprobs = jax.nn.log_softmax(compute_logits(params, hidden), axis=-1)
            p_lp, p_rank, p_top_lp, p_top_ids = top_logprobs(all_logprobs, plan.targets)
        out = dataclasses.replace(out, prompt_logprob=p_lp, prompt_rank=p_rank,
                                  prompt_top_logprobs=p_top_lp, prompt_top_ids=p_top_ids)
    return out, kv, penalties


def _record_prompt_tokens(penalties: PenaltyState, plan: DevicePlan,
                          meta: AttentionMetadata) -> PenaltyState:
    """A row whose step starts at position 0 begins a new request in its slot: clear the slot,
    then mark the prompt tokens this step carries."""
    num_slots = penalties.prompt_mask.shape[0]
    q_lens = plan.cu_q_lens[1:] - plan.cu_q_lens[:-1]
    starts = (q_lens > 0) & (plan.seq_lens == q_lens)
    reset_rows = jnp.where(starts, plan.slot_ids, num_slots)
    prompt_mask = penalties.prompt_mask.at[reset_rows].set(False, mode="drop")
    output_counts = penalties.output_counts.at[reset_rows].set(0, mode="drop")
    t = jnp.arange(plan.input_ids.shape[0])
    is_prompt = (t < plan.cu_q_lens[-1]) & (meta.positions < plan.prompt_lens[meta.token_seq])
    rows = jnp.where(is_prompt, plan.slot_ids[meta.token_seq], num_slots)
    prompt_mask = prompt_mask.at[rows, plan.input_ids].set(True, mode="drop")
    return PenaltyState(prompt_mask=prompt_mask, output_counts=output_counts)
