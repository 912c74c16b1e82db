"""On-device sampling over fixed-shape per-row arrays.

Every row carries its own temperature, top-k, top-p, min-p, penalties and seed, so one
compiled function serves any mix of requests. Order (as in vLLM): penalties -> temperature
-> min-p (on probabilities) -> top-k -> top-p (renormalised over the survivors) -> sample.
Noise for a token is a function of (seed, position) alone, so a seeded request samples
the same tokens whatever else shares its batch. Temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top-n logprobs computed per token (as vLLM's default max_logprobs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings, each [S]. top_k <= 0 means no top-k."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array  # uint32


def apply_penalties(logits: jax.Array, prompt_mask: jax.Array, output_counts: jax.Array,
                    batch: SamplingBatch) -> jax.Array:
    """Repetition penalty over prompt+output tokens (divide positive logits, multiply negative
    ones); presence and frequency penalties over output tokens only (as vLLM)."""
    seen = prompt_mask | (output_counts > 0)
    rep = batch.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = output_counts.astype(logits.dtype)
    logits = logits - batch.frequency_penalty[:, None] * counts
    return logits - batch.presence_penalty[:, None] * (counts > 0)


def truncation_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array,
                    min_p: jax.Array) -> jax.Array:
    """Boolean [B, V]: tokens that survive min-p, top-k and top-p. Ties at a cut-off survive.

    `logits` are already temperature-scaled. Each filter is a threshold on the logit value,
    so one descending sort serves all three.
    """
    vocab = logits.shape[-1]
    max_logit = jnp.max(logits, axis=-1, keepdims=True)
    # min-p: p >= min_p * p_max  <=>  logit >= max_logit + log(min_p)
    min_p_cut = jnp.where(min_p[:, None] > 0, max_logit + jnp.log(min_p[:, None]), -jnp.inf)
    ordered = jnp.sort(logits, axis=-1, descending=True)
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    top_k_cut = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    cut = jnp.maximum(min_p_cut, top_k_cut)
    # top-p over the survivors, renormalised: keep the smallest prefix of the ordered list
    # whose mass reaches top_p (a token is kept if the mass strictly before it is < top_p).
    survivors = jnp.where(ordered >= cut, ordered, -jnp.inf)
    probs = jax.nn.softmax(survivors, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p[:, None]) & (ordered >= cut)
    last_kept = jnp.sum(keep_sorted, axis=-1, keepdims=True) - 1
    top_p_cut = jnp.take_along_axis(ordered, jnp.maximum(last_kept, 0), axis=-1)
    return logits >= jnp.maximum(cut, top_p_cut)


def token_noise_keys(seed: jax.Array, positions: jax.Array) -> jax.Array:
    """One PRNG key per row from (seed, position of the token being sampled)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, positions)


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_noise(seed: jax.Array, positions: jax.Array, vocab_size: int) -> jax.Array:
    """Standard Gumbel noise [B, V], a function of (seed, position, token id) alone.

    Threefry draws two 32-bit words per row (the row's key); each token's uniform is a
    counter hash of (key, token id): two rounds of MurmurHash3's finaliser. Threefry for every
    token would be most of `sample`'s time at a large vocabulary; the hash is a few integer ops
    a token. Uniforms take 23 bits, centred in
    their bins: u in [2^-24, 1 - 2^-24], so the noise is finite (within [-2.8, 16.7]).
    """
    words = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(
        token_noise_keys(seed, positions))
    tokens = jnp.arange(vocab_size, dtype=jnp.uint32)[None, :]
    h = _mix32(tokens * jnp.uint32(0x9E3779B9) + words[:, :1])
    h = _mix32(h ^ words[:, 1:])
    u = ((h >> 9).astype(jnp.float32) + 0.5) * (2.0 ** -23)
    return -jnp.log(-jnp.log(u))


def sample(logits: jax.Array, batch: SamplingBatch, positions: jax.Array, *,
           truncate: bool) -> jax.Array:
    """Next token per row from already-penalised float32 logits [B, V].

    Branch-free: rows are greedy or sampled by `where`, not `lax.cond` (a conditional on a
    GPU copies its predicate to the host and stalls the stream), and one argmax serves both:
    greedy rows take it over the logits, sampled rows over temperature-scaled logits plus
    Gumbel noise (Gumbel-max). `truncate` (static) adds top-k/top-p/min-p, whose sort is the
    costly part; without it they are ignored.
    """
    sampled = (batch.temperature > 0)[:, None]
    scaled = logits / jnp.where(sampled, batch.temperature[:, None], 1.0)
    if truncate:
        keep = truncation_mask(scaled, batch.top_k, batch.top_p, batch.min_p)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    noisy = scaled + gumbel_noise(batch.seed, positions, logits.shape[-1])
    return jnp.argmax(jnp.where(sampled, noisy, logits), axis=-1).astype(jnp.int32)


def top_logprobs(logprobs: jax.Array, chosen: jax.Array, *, ranked: bool = True,
                 allowed: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """For rows of log-probabilities [N, V] and chosen tokens [N]: the chosen token's logprob
    and rank (1 = most likely), and the top MAX_LOGPROBS (logprobs, ids). With `ranked`
    False (static) only the chosen logprob is computed, the rest are zeros: top-k is a sort.
    With `allowed` [N, V], ranks and the top list count only allowed tokens (values stay the
    unmasked log-probabilities; fewer allowed tokens than MAX_LOGPROBS pad with -inf)."""
    chosen_lp = jnp.take_along_axis(logprobs, chosen[:, None], axis=-1)[:, 0]
    if not ranked:
        rows = logprobs.shape[0]
        return (chosen_lp, jnp.zeros((rows,), jnp.int32),
                jnp.zeros((rows, MAX_LOGPROBS), logprobs.dtype),
                jnp.zeros((rows, MAX_LOGPROBS), jnp.int32))
    if allowed is not None:
        logprobs = jnp.where(allowed, logprobs, -jnp.inf)
    rank = jnp.sum(logprobs > chosen_lp[:, None], axis=-1).astype(jnp.int32) + 1
    top_lp, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    return chosen_lp, rank, top_lp, top_ids.astype(jnp.int32)
