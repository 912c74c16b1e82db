"""The compiled step: `step(params, kv, slots, plan) -> (packed outputs, kv, slots)`.

Pure: writes this step's K/V into pages, runs the decoder over a mix of decode tokens and
prefill chunks, samples one token per row and computes logprobs. The KV cache and the
per-slot state are donated by the caller so XLA updates them in place. `forward_step` and
`sample_step` are the same step in two halves (see there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.cache.kv import AttentionMetadata, KVCache
from dendrite_jax.config import ModelConfig
from dendrite_jax.engine import step_output
from dendrite_jax.engine.logit_bias import LogitBias, apply_logit_bias
from dendrite_jax.engine.sampling import apply_penalties, sample, top_logprobs
from dendrite_jax.engine.step_plan import DevicePlan, StepShape, unpack
from dendrite_jax.grammar.device_automaton import (
    FROM_SLOT,
    NO_AUTOMATON,
    AutomatonTables,
    automaton_step,
)
from dendrite_jax.grammar.mask import allowed_tokens
from dendrite_jax.model.llama import compute_logits, forward
from dendrite_jax.model.params import Params

# An input id of FROM_LAST_TOKEN means "the token this slot sampled in its previous step",
# read from the device-side buffer: the host can launch a step before it has read the last.
FROM_LAST_TOKEN = -1
PROMPT_LOGPROB_CHUNK = 64  # tokens whose logits a prompt-logprob step holds at once


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot request state kept on device between steps."""

    prompt_mask: jax.Array  # [num_slots, V] bool: token occurs in the prompt
    output_counts: jax.Array  # [num_slots, V] int32: times generated (and fed back) so far
    last_token: jax.Array  # [num_slots] int32: the token sampled in the slot's last step
    # [num_slots] int32: the device-automaton state after that token (NO_AUTOMATON: none)
    automaton_state: jax.Array

    @classmethod
    def create(cls, num_slots: int, vocab_size: int) -> SlotState:
        return cls(prompt_mask=jnp.zeros((num_slots, vocab_size), bool),
                   output_counts=jnp.zeros((num_slots, vocab_size), jnp.int32),
                   last_token=jnp.zeros((num_slots,), jnp.int32),
                   automaton_state=jnp.full((num_slots,), NO_AUTOMATON, jnp.int32))


def step(params: Params, kv: KVCache, slots: SlotState, plan_buffer: jax.Array,
         token_mask: jax.Array, automata: AutomatonTables | None, logit_bias: LogitBias, *,
         cfg: ModelConfig, shape: StepShape,
         attention_backend: str) -> tuple[jax.Array, KVCache, SlotState]:
    """One step (or a burst of `shape.burst` decode steps) over the plan's flat tokens
    (`step_plan`); returns its outputs packed as
    `step_output.output_layout(shape)`, one such buffer per step of a burst, in order.
    `token_mask` [S, ceil(V/32)] holds each row's allowed next tokens (`grammar.mask`);
    `automata` (None: not in use) constrain the rows the plan gives an automaton state;
    `logit_bias` holds each slot's biases (`engine.logit_bias`)."""
    plan = unpack(plan_buffer, shape)
    if shape.burst > 1:
        return _burst(params, kv, slots, plan, token_mask, automata, logit_bias, cfg=cfg,
                      shape=shape, attention_backend=attention_backend)
    out, hidden, kv, slots = _model_and_sample(params, kv, slots, plan, token_mask, automata,
                                               logit_bias, cfg=cfg, shape=shape,
                                               attention_backend=attention_backend)
    if shape.prompt_logprobs:
        out.update(zip(("prompt_logprob", "prompt_rank", "prompt_top_logprobs",
                        "prompt_top_ids"), _prompt_logprobs(params, hidden, plan.targets),
                       strict=True))
    return step_output.pack(shape, out), kv, slots


def _prompt_logprobs(params: Params, hidden: jax.Array,
                     targets: jax.Array) -> tuple[jax.Array, ...]:
    """`top_logprobs` of every token's target, PROMPT_LOGPROB_CHUNK tokens at a time: a step's
    whole [T, V] logits would be the largest temporary of any program (4 GB at 8,192 tokens
    and a 128k vocabulary)."""
    num_tokens = hidden.shape[0]
    chunk = min(PROMPT_LOGPROB_CHUNK, num_tokens)

    def one(args):
        h, t = args
        return top_logprobs(jax.nn.log_softmax(compute_logits(params, h), axis=-1), t)

    with jax.named_scope("prompt_logprobs"):
        outs = jax.lax.map(one, (hidden.reshape(-1, chunk, hidden.shape[-1]),
                                 targets.reshape(-1, chunk)))
    return tuple(o.reshape(num_tokens, *o.shape[2:]) for o in outs)


def _burst(params: Params, kv: KVCache, slots: SlotState, plan: DevicePlan,
           token_mask: jax.Array, automata: AutomatonTables | None, logit_bias: LogitBias, *,
           cfg: ModelConfig, shape: StepShape,
           attention_backend: str) -> tuple[jax.Array, KVCache, SlotState]:
    """`shape.burst` decode steps in one executable, each the single step `plan` describes one
    position further on: step j feeds every row the token step j - 1 sampled (from the
    slots' last-token buffer, and its automaton state from the slot's). The same tokens as
    that many steps launched one by one."""
    single = dataclasses.replace(shape, burst=1)
    live = plan.q_lens > 0  # padding rows stay empty (seq_len 0: no attention, no write)
    later_states = jnp.where(plan.automaton_state == NO_AUTOMATON, NO_AUTOMATON, FROM_SLOT)

    def one_step(j, carry):
        kv, slots, outs = carry
        p = dataclasses.replace(
            plan, seq_lens=jnp.where(live, plan.seq_lens + j, 0),
            input_ids=jnp.where(j == 0, plan.input_ids, FROM_LAST_TOKEN),
            reset=jnp.where(j == 0, plan.reset, 0),
            automaton_state=jnp.where(j == 0, plan.automaton_state, later_states))
        out, _, kv, slots = _model_and_sample(params, kv, slots, p, token_mask, automata,
                                              logit_bias, cfg=cfg, shape=single,
                                              attention_backend=attention_backend)
        return kv, slots, outs.at[j].set(step_output.pack(single, out))

    size = sum(int(np.prod(s)) for _, s, _ in step_output.output_layout(single))
    # A loop, not unrolled: an unrolled burst runs no faster and compiles the model once per
    # step of the burst.
    kv, slots, outs = jax.lax.fori_loop(
        0, shape.burst, one_step, (kv, slots, jnp.zeros((shape.burst, size), jnp.int32)))
    return outs.reshape(-1), kv, slots


# A split step is `step` in two executables, `forward_step` then `sample_step`, so the host can
# fill the token mask while the device runs the model (constrained decoding keeps the overlap).
# Only for shapes without prompt logprobs.

def forward_step(params: Params, kv: KVCache, slots: SlotState, plan_buffer: jax.Array, *,
                 cfg: ModelConfig, shape: StepShape,
                 attention_backend: str) -> tuple[jax.Array, KVCache, SlotState]:
    """The model half of a split step: float32 logits [S, V] of each row's last token."""
    plan = unpack(plan_buffer, shape)
    hidden, kv, slots = _run_model(params, kv, slots, plan, cfg=cfg, shape=shape,
                                   attention_backend=attention_backend)
    return _last_token_logits(params, hidden, plan, shape), kv, slots


def sample_step(logits: jax.Array, slots: SlotState, plan_buffer: jax.Array,
                token_mask: jax.Array, automata: AutomatonTables | None,
                logit_bias: LogitBias, *, shape: StepShape) -> tuple[jax.Array, SlotState]:
    """The sampling half of a split step: the same packed outputs as `step`."""
    assert not shape.prompt_logprobs, "a split step has no prompt logprobs"
    out, slots = _sample(logits, slots, unpack(plan_buffer, shape), token_mask, automata,
                         logit_bias, shape)
    return step_output.pack(shape, out), slots


def _run_model(params: Params, kv: KVCache, slots: SlotState, plan: DevicePlan, *,
               cfg: ModelConfig, shape: StepShape,
               attention_backend: str) -> tuple[jax.Array, KVCache, SlotState]:
    """The decoder over the step's tokens (K/V written), and the inputs' penalty statistics."""
    meta = AttentionMetadata.build(plan.q_lens, plan.seq_lens, plan.page_tables,
                                   num_tokens=shape.num_tokens, decode_only=shape.decode_only,
                                   page_size=kv.page_size, num_pages=kv.num_pages,
                                   slot_ids=plan.slot_ids)
    token_slots = meta.token_slots
    input_ids = jnp.where(plan.input_ids == FROM_LAST_TOKEN, slots.last_token[token_slots],
                          plan.input_ids)
    hidden, kv = forward(params, kv, input_ids, meta, cfg, attention_backend=attention_backend)
    with jax.named_scope("slot_state"):
        slots = _record_inputs(slots, plan, meta, input_ids, token_slots)
    return hidden, kv, slots


def _model_and_sample(params: Params, kv: KVCache, slots: SlotState, plan: DevicePlan,
                      token_mask: jax.Array, automata: AutomatonTables | None,
                      logit_bias: LogitBias, *, cfg: ModelConfig, shape: StepShape,
                      attention_backend: str):
    """The model over the step's tokens, then each row's next token: (sampled outputs,
    hidden states, kv, slots)."""
    hidden, kv, slots = _run_model(params, kv, slots, plan, cfg=cfg, shape=shape,
                                   attention_backend=attention_backend)
    out, slots = _sample(_last_token_logits(params, hidden, plan, shape), slots, plan,
                         token_mask, automata, logit_bias, shape)
    return out, hidden, kv, slots


def _last_token_logits(params: Params, hidden: jax.Array, plan: DevicePlan,
                       shape: StepShape) -> jax.Array:
    """Float32 logits [R, V] of each row's last token (padding rows: any token's)."""
    with jax.named_scope("sampling"):
        if shape.decode_only:
            return compute_logits(params, hidden)
        last_token = jnp.maximum(jnp.cumsum(plan.q_lens) - 1, 0)
        return compute_logits(params, hidden[last_token])


def _sample(logits: jax.Array, slots: SlotState, plan: DevicePlan, token_mask: jax.Array,
            automata: AutomatonTables | None, logit_bias: LogitBias,
            shape: StepShape) -> tuple[dict[str, jax.Array], SlotState]:
    """Logit biases, penalties, the token mask (and the automata's), sampling and logprobs; the sampled
    tokens (and the automaton states they lead to) go to the slots' buffers."""
    with jax.named_scope("sampling"):
        raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
        b = plan.sampling
        # Branch-free (see `sample`): no biases and neutral penalties leave the logits
        # bit-identical.
        logits = apply_logit_bias(logits, logit_bias, plan.slot_ids)
        logits = apply_penalties(logits, slots.prompt_mask[plan.slot_ids],
                                 slots.output_counts[plan.slot_ids], b)
        allowed = allowed_tokens(token_mask, logits.shape[-1])
        if automata is not None:
            states = jnp.where(plan.automaton_state == FROM_SLOT,
                               slots.automaton_state[plan.slot_ids], plan.automaton_state)
            by_automaton, next_states = automaton_step(automata, states)
            allowed = allowed & by_automaton
        logits = jnp.where(allowed, logits, -jnp.inf)
        # The sampled token will sit at position seq_len: noise depends on (seed, position).
        tokens = sample(logits, b, plan.seq_lens, truncate=shape.needs_sort)
        sampled_rows = jnp.where(plan.sample > 0, plan.slot_ids, slots.last_token.shape[0])
        slots = dataclasses.replace(
            slots, last_token=slots.last_token.at[sampled_rows].set(tokens, mode="drop"))
        if automata is not None:
            reached = jnp.take_along_axis(next_states, tokens[:, None], axis=1)[:, 0]
            reached = jnp.where(states >= 0, reached, NO_AUTOMATON)
            slots = dataclasses.replace(slots, automaton_state=slots.automaton_state.at[
                sampled_rows].set(reached, mode="drop"))
        # Ranks and top alternatives are among the tokens the row's constraint allows (all,
        # unconstrained): beam search takes its candidates from them.
        logprob, rank, top_lp, top_ids = top_logprobs(raw_logprobs, tokens,
                                                      ranked=shape.needs_sort, allowed=allowed)
    return dict(tokens=tokens, logprob=logprob, rank=rank, top_logprobs=top_lp,
                top_ids=top_ids), slots


def _record_inputs(slots: SlotState, plan: DevicePlan, meta: AttentionMetadata,
                   input_ids: jax.Array, token_slots: jax.Array) -> SlotState:
    """Penalty statistics from this step's input tokens.

    A row flagged `reset` is the first of a request newly placed in its slot (admitted, or
    re-admitted after preemption): the slot is cleared first. Inputs before prompt_len mark the
    prompt mask; inputs after it are output tokens fed back, counted once each, so a recomputed
    request rebuilds identical counts.
    """
    num_slots = slots.prompt_mask.shape[0]
    reset_rows = jnp.where(plan.reset > 0, plan.slot_ids, num_slots)
    prompt_mask = slots.prompt_mask.at[reset_rows].set(False, mode="drop")
    output_counts = slots.output_counts.at[reset_rows].set(0, mode="drop")
    in_prompt = meta.positions < plan.prompt_lens[meta.token_seq]
    prompt_rows = jnp.where(meta.valid & in_prompt, token_slots, num_slots)
    output_rows = jnp.where(meta.valid & ~in_prompt, token_slots, num_slots)
    prompt_mask = prompt_mask.at[prompt_rows, input_ids].set(True, mode="drop")
    output_counts = output_counts.at[output_rows, input_ids].add(1, mode="drop")
    return dataclasses.replace(slots, prompt_mask=prompt_mask, output_counts=output_counts)


__all__ = ["FROM_LAST_TOKEN", "SlotState", "forward_step", "sample_step", "step"]
