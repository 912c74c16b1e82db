"""A full-precision tail beside pages of lower precision (FP8 or codes).

Attention over a compressed cache loses most where a head attends most: the first token (the
attention sink, often a third of a head's attention) and the most recent tokens. The tail keeps
exactly those at the model's precision, per sequence slot:

- the sink: position 0's key and value;
- the window: the last `window` positions' keys and values, position p at p % window.

A query at position p then attends to position 0 and positions (p - window, p] at full
precision, and to positions [1, p - window] from the pages: the page kernels mask out what the
tail holds (`tail_window`) and return their softmax's log-sum-exp, and `merge` joins the two
parts exactly. Every token is still written to the pages, so the tail is only ever read, never
flushed. The tail is per slot: a sequence must have written its own earlier positions, so the
engine gives it no prefix-cache hits (`engine.settings`), no forked beams (`search.beam`) and
no sibling's prompt pages (parallel samples compute their own prompts: `Scheduler`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FullPrecisionTail:
    """Sink [L, S, Hkv, hd] and window [L, S, window, Hkv, hd] keys and values per slot."""

    sink_k: jax.Array
    sink_v: jax.Array
    window_k: jax.Array
    window_v: jax.Array

    @property
    def window(self) -> int:
        return self.window_k.shape[2]

    @classmethod
    def create(cls, num_layers: int, num_slots: int, window: int, num_kv_heads: int,
               head_dim: int, dtype) -> FullPrecisionTail:
        if window < 1:
            raise ValueError(f"a full-precision tail needs a window of at least 1, got {window}")
        sink = (num_layers, num_slots, num_kv_heads, head_dim)
        ring = (num_layers, num_slots, window, num_kv_heads, head_dim)
        return cls(sink_k=jnp.zeros(sink, dtype), sink_v=jnp.zeros(sink, dtype),
                   window_k=jnp.zeros(ring, dtype), window_v=jnp.zeros(ring, dtype))

    @staticmethod
    def bytes_per_slot(num_layers: int, window: int, num_kv_heads: int, head_dim: int,
                       dtype) -> int:
        return 2 * num_layers * (1 + window) * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TailTokens:
    """Where a step's tokens sit in the tail. Per token [T]: its row (`rows`), its position
    and whether it is a real token (`valid`). Per row [R]: its slot (`slots`), its first
    position in this step (`starts`), its length after it (`ends`) and its first token on the
    token axis (`offsets`); a row with no tokens has `starts == ends`."""

    rows: jax.Array
    positions: jax.Array
    valid: jax.Array
    slots: jax.Array
    starts: jax.Array
    ends: jax.Array
    offsets: jax.Array


def context(tail: FullPrecisionTail, layer: jax.Array, k: jax.Array, v: jax.Array,
            tokens: TailTokens, sliding_window: int | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each token's full-precision keys and values [T, 1 + window, Hkv, hd] (the sink, then
    positions p - window + 1 .. p) and which of them it attends to ([T, 1 + window]; with a
    `sliding_window`, only positions inside it). Positions written in this step come from the
    step's own k, v [T, Hkv, hd] (a sequence's tokens are consecutive on the token axis);
    earlier ones from the tail."""
    window, num_tokens = tail.window, k.shape[0]
    slots = jnp.clip(tokens.slots, 0, tail.sink_k.shape[1] - 1)[tokens.rows]
    starts = tokens.starts[tokens.rows]
    pos = tokens.positions[:, None] - window + 1 + jnp.arange(window)  # [T, W]
    this_step = pos >= starts[:, None]
    index = jnp.clip(jnp.arange(num_tokens)[:, None] - (tokens.positions[:, None] - pos), 0,
                     num_tokens - 1)
    ring = jnp.mod(pos, window)
    first = tokens.offsets[tokens.rows]  # the row's first token: its position 0 if starts == 0

    def keys_of(new: jax.Array, sink: jax.Array, ring_pages: jax.Array) -> jax.Array:
        recent = jnp.where(this_step[..., None, None], new[index],
                           ring_pages[layer][slots[:, None], ring])
        sink_now = jnp.where((starts == 0)[:, None, None], new[first], sink[layer][slots])
        return jnp.concatenate([sink_now[:, None], recent.astype(new.dtype)], axis=1)

    key_pos = jnp.concatenate([jnp.zeros_like(pos[:, :1]), pos], axis=1)  # [T, 1 + W]
    keep = tokens.valid[:, None] & jnp.concatenate(
        [jnp.ones_like(this_step[:, :1]), pos >= 1], axis=1)
    if sliding_window is not None:
        keep &= key_pos > tokens.positions[:, None] - sliding_window
    return keys_of(k, tail.sink_k, tail.window_k), keys_of(v, tail.sink_v, tail.window_v), keep


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, keep: jax.Array, *,
           sm_scale: float) -> tuple[jax.Array, jax.Array]:
    """Each query [T, Hq, hd] over its own keys/values [T, K, Hkv, hd] where `keep` [T, K]:
    (output [T, Hq, hd] float32, log-sum-exp of the scaled scores [T, Hq]; -inf where none)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    qg = q.reshape(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    s = jnp.einsum("thgd,tkhd->thgk", qg, keys, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(keep[:, None, None, :], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    out = jnp.einsum("thgk,tkhd->thgd", p, values.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return (out.reshape(num_tokens, num_heads, head_dim),
            lse.reshape(num_tokens, num_heads))


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array) -> jax.Array:
    """The softmax over two disjoint key sets from each one's normalised output [T, Hq, hd]
    and log-sum-exp [T, Hq] (-inf: an empty set)."""
    m = jnp.maximum(lse_a, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = jnp.where(wa + wb > 0, wa + wb, 1.0)
    return (out_a.astype(jnp.float32) * (wa / total)[..., None]
            + out_b.astype(jnp.float32) * (wb / total)[..., None])


def write(tail: FullPrecisionTail, layer: jax.Array, keys: jax.Array, values: jax.Array,
          tokens: TailTokens) -> FullPrecisionTail:
    """The tail after the step, from the step's `context` (unshifted keys and values [T,
    1 + window, Hkv, hd]): a row's last token's context is exactly what the row's slot holds
    next, its sink and its last `window` positions (rows without tokens write nowhere).

    Writing whole rows from the gathered context, not each token into the tail, makes the
    write depend on the gather: XLA then updates the tail in place, where the token-wise
    write, independent of the gather, made it copy the whole tail every layer."""
    num_slots, window, num_tokens = tail.sink_k.shape[1], tail.window, keys.shape[0]
    last = jnp.clip(tokens.offsets + tokens.ends - tokens.starts - 1, 0, num_tokens - 1)  # [R]
    at = jnp.where(tokens.ends > tokens.starts, tokens.slots, num_slots)
    # context index 1 + i holds position ends - window + i, which the ring keeps at
    # (ends - window + i) % window: ring entry j is context index 1 + (j - ends) % window.
    order = 1 + jnp.mod(jnp.arange(window)[None, :] - tokens.ends[:, None], window)  # [R, W]

    def put(sink, ring_pages, context_rows):
        rows = context_rows[last]  # [R, 1 + W, Hkv, hd]
        sink = sink.at[layer, at].set(rows[:, 0].astype(sink.dtype), mode="drop")
        ring = jnp.take_along_axis(rows, order[:, :, None, None], axis=1)
        ring_pages = ring_pages.at[layer, at].set(ring.astype(ring_pages.dtype), mode="drop")
        return sink, ring_pages

    sink_k, window_k = put(tail.sink_k, tail.window_k, keys)
    sink_v, window_v = put(tail.sink_v, tail.window_v, values)
    return FullPrecisionTail(sink_k=sink_k, sink_v=sink_v, window_k=window_k, window_v=window_v)


def merge_and_write(tail: FullPrecisionTail, layer: jax.Array, q: jax.Array, k: jax.Array,
                    v: jax.Array, tokens: TailTokens, out: jax.Array, lse: jax.Array, *,
                    sm_scale: float, sliding_window: int | None = None,
                    k_shift: jax.Array | None = None) -> tuple[jax.Array, FullPrecisionTail]:
    """The pages' attention (out, lse from a kernel run with `tail_window`) joined with the
    tail's, then the step's k, v [T, Hkv, hd] written into the tail: (out [T, Hq, hd] float32,
    the tail). `k_shift` [Hkv, hd] is subtracted from the tail's keys so that their scores
    carry the pages' shift (FP8 pages hold keys minus a mean)."""
    keys, values, keep = context(tail, layer, k, v, tokens, sliding_window)
    tail = write(tail, layer, keys, values, tokens)
    if k_shift is not None:
        keys = keys.astype(jnp.float32) - k_shift[None, None]
    out_tail, lse_tail = attend(q, keys, values, keep, sm_scale=sm_scale)
    return merge(out, lse, out_tail, lse_tail), tail
