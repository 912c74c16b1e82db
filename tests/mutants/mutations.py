"""The mutations: one realistic bug each (an off-by-one, `<` for `<=`, a wrong index, a dropped
term) in one mechanism, and the fast tests that should catch it.

A mutation replaces `old`, which must occur exactly once in `path`, by `new`. Its `tests` are
pytest node ids or files, chosen to run in well under a minute on 2 cores: unit and property
tests first, the real model only where the bug lives in the compiled step.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    mechanism: str
    path: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]


SAMPLING = "dendrite_jax/engine/sampling.py"
STEP = "dendrite_jax/engine/step.py"
GOLDEN_SAMPLING = "tests/golden/test_golden.py::test_matches_golden[sampling]"

MUTATIONS: tuple[Mutation, ...] = (
    # ---------------------------------------------------------------------------- sampling
    Mutation("top-p-mass-includes-token", "sampling", SAMPLING,
             "mass_before = jnp.cumsum(probs, axis=-1) - probs",
             "mass_before = jnp.cumsum(probs, axis=-1)",
             ("tests/engine/test_sampling.py::test_truncation_masks_exact",)),
    Mutation("top-p-keeps-the-token-at-its-boundary", "sampling", SAMPLING,
             "keep_sorted = (mass_before < top_p[:, None]) & (ordered >= cut)",
             "keep_sorted = (mass_before <= top_p[:, None]) & (ordered >= cut)",
             ("tests/engine/test_sampling.py::test_top_p_at_its_boundary",)),
    Mutation("sampled-rows-take-the-greedy-token", "sampling", SAMPLING,
             "return jnp.argmax(jnp.where(sampled, noisy, logits), axis=-1)",
             "return jnp.argmax(jnp.where(sampled, scaled, logits), axis=-1)",
             ("tests/engine/test_sampling.py::test_greedy_and_sampled_rows_in_one_batch",)),
    Mutation("top-k-of-1-means-off", "sampling", SAMPLING,
             "k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)",
             "k = jnp.where((top_k > 1) & (top_k < vocab), top_k, vocab)",
             ("tests/engine/test_sampling.py::test_truncation_masks_exact",)),
    # ---------------------------------------------------------------------------- penalties
    Mutation("repetition-ignores-output-tokens", "penalties", SAMPLING,
             "seen = prompt_mask | (output_counts > 0)",
             "seen = prompt_mask",
             ("tests/engine/test_sampling.py::test_penalties_match_formulae",)),
    Mutation("first-output-token-counted-as-prompt", "penalties", STEP,
             "in_prompt = meta.positions < plan.prompt_lens[meta.token_seq]",
             "in_prompt = meta.positions <= plan.prompt_lens[meta.token_seq]",
             ("tests/engine/test_sampler_in_engine.py::"
              "test_penalties_count_every_output_token_apart_from_the_prompt",)),
    # ---------------------------------------------------------------------------- seeds
    Mutation("noise-ignores-position", "seeds", SAMPLING,
             "jax.random.fold_in(jax.random.key(s), p)",
             "jax.random.key(s)",
             ("tests/engine/test_sampling.py::"
              "test_sampler_follows_the_distribution_along_one_request",)),
    Mutation("noise-keyed-by-slot", "seeds", STEP,
             "tokens = sample(logits, b, plan.seq_lens, truncate=shape.needs_sort)",
             "tokens = sample(logits, b, plan.slot_ids, truncate=shape.needs_sort)",
             ("tests/engine/test_parallel_sampling.py::test_each_sample_equals_its_seed_alone",)),
    Mutation("noise-at-position-zero", "seeds", STEP,
             "tokens = sample(logits, b, plan.seq_lens, truncate=shape.needs_sort)",
             "tokens = sample(logits, b, 0 * plan.seq_lens, truncate=shape.needs_sort)",
             ("tests/engine/test_sampler_in_engine.py::"
              "test_seeded_tokens_follow_the_sampler_at_their_positions",)),
    # ---------------------------------------------------------------------------- pool
    Mutation("free-while-still-referenced", "pool", "dendrite_jax/cache/pool.py",
             "if self._refs[p] == 0:",
             "if self._refs[p] <= 1:",
             ("tests/cache/test_pool.py",)),
    # ---------------------------------------------------------------------------- radix tree
    Mutation("partial-edge-match-returns-whole-edge", "radix tree", "dendrite_jax/cache/radix.py",
             "found.extend(child.values[:m])",
             "found.extend(child.values)",
             ("tests/cache/test_radix.py",)),
    # ---------------------------------------------------------------------------- prefix cache
    Mutation("lookup-does-not-touch-lru", "prefix cache", "dendrite_jax/cache/prefix_cache.py",
             "pages = self.tree.find_prefix(tokens)",
             "pages = self.tree.find_prefix(tokens, touch=False)",
             ("tests/cache/test_radix.py",)),
    Mutation("commit-pins-cached-pages-again", "prefix cache",
             "dendrite_jax/cache/prefix_cache.py",
             "if p == q and p not in already]",
             "if p == q]",
             ("tests/cache/test_radix.py", "tests/engine/test_kv_blocks.py")),
    Mutation("whole-prompt-hit-leaves-nothing-to-compute", "prefix cache",
             "dendrite_jax/engine/scheduler.py",
             "return min(self.blocks.cached_tokens(r.tokens), r.num_tokens - 1)",
             "return self.blocks.cached_tokens(r.tokens)",
             ("tests/engine/test_serving_api.py::test_a_repeat_whose_whole_prompt_is_cached",)),
    # ---------------------------------------------------------------------------- scheduling
    Mutation("decodes-outside-token-budget", "scheduling", "dendrite_jax/engine/scheduler.py",
             "budget = self.max_num_batched_tokens - len(decodes)",
             "budget = self.max_num_batched_tokens",
             ("tests/engine/test_continuous_batching.py",)),
    # ---------------------------------------------------------------------------- chunking
    Mutation("fit-ignores-decode-tokens", "chunking", "dendrite_jax/engine/buckets.py",
             "return below - num_decode",
             "return below",
             ("tests/engine/test_buckets.py",)),
    Mutation("scheduler-ignores-the-cut", "chunking", "dendrite_jax/engine/scheduler.py",
             "kept.append((r, min(n, tokens)))",
             "kept.append((r, n))",
             ("tests/engine/test_scheduler.py",)),
    # ---------------------------------------------------------------------------- attention masks
    Mutation("causal-mask-excludes-self", "attention masks",
             "kernels_pallas/paged_attention/reference.py",
             "mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (",
             "mask = (k_pos[None, None, :] < q_pos[:, :, None]) & (",
             ("tests/kernels/test_paged_attention_reference.py::test_matches_dense_attention",)),
    Mutation("sliding-window-one-wider", "attention masks",
             "kernels_pallas/paged_attention/reference.py",
             "mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window",
             "mask &= k_pos[None, None, :] >= q_pos[:, :, None] - sliding_window",
             ("tests/kernels/test_paged_attention_reference.py::"
              "test_sliding_window_and_soft_cap",)),
    # ---------------------------------------------------------------------------- RoPE
    Mutation("rotary-sin-sign", "RoPE", "dendrite_jax/model/llama.py",
             "x2 * cos + x1 * sin",
             "x2 * cos - x1 * sin",
             ("tests/model/test_hf_families.py::test_logits_match_transformers",)),
    # ---------------------------------------------------------------------------- constraints
    Mutation("end-of-text-never-allowed", "constraints",
             "dendrite_jax/grammar/device_automaton.py",
             "allowed = (ends != DEAD) | (tables.is_end[None] & tables.accepting[start][:, None])",
             "allowed = ends != DEAD",
             ("tests/grammar/test_device_automaton.py::"
              "test_masks_equal_llguidance_along_random_walks",)),
    Mutation("bounded-repeat-one-short", "constraints", "dendrite_jax/grammar/byte_dfa.py",
             "for _ in range(hi - lo):",
             "for _ in range(hi - lo - 1):",
             ("tests/grammar/test_byte_dfa.py",)),
    Mutation("warm-up-skips-the-split-steps", "constraints", "dendrite_jax/engine/engine.py",
             "split=self.pipeline.splits if self.model.tokenizer is not None",
             "split=self.pipeline.splits if self.model.tokenizer is None",
             ("tests/grammar/test_warmup.py",)),
    # ---------------------------------------------------------------------------- beams
    Mutation("length-penalty-length-off-by-one", "beams", "dendrite_jax/search/beam.py",
             "generated = self.cur_len + 1 - len(self.prompt)",
             "generated = self.cur_len - len(self.prompt)",
             ("tests/golden/test_golden.py::test_matches_golden[beams]",
              "tests/search/test_beam.py::test_equals_transformers")),
    # ---------------------------------------------------------------------------- streaming
    Mutation("stream-text-steps-back", "streaming", "dendrite_jax/frontend/streaming.py",
             "text_end = max(position.text, text_end - held_back(request.params))",
             "text_end = text_end - held_back(request.params)",
             ("tests/frontend/test_streaming.py::"
              "test_text_shorter_than_what_is_held_back_streams_nothing_yet",
              "tests/frontend/test_streaming.py::test_deltas_joined_are_the_output")),
    # ---------------------------------------------------------------------------- server fields
    Mutation("usage-counts-last-delta-only", "server fields", "dendrite_jax/serve/answers.py",
             "state.tokens += len(d.token_ids)",
             "state.tokens = len(d.token_ids)",
             ("tests/serve/test_openai_fields.py::test_the_usage_chunk_ends_the_stream",)),
    Mutation("finish-only-chunk-dropped", "server fields", "dendrite_jax/serve/answers.py",
             "elif (piece.text or d.finish_reason is not None",
             "elif (piece.text",
             ("tests/serve/test_server.py::test_streams_that_end_at_end_of_text",)),
    Mutation("chunk-loses-finish-reason", "server fields", "dendrite_jax/serve/answers.py",
             """yield sse(shapes.chunk(rid, [shapes.chunk_choice(d.index, piece,
                                                                 d.finish_reason, state)]))""",
             """yield sse(shapes.chunk(rid, [shapes.chunk_choice(d.index, piece,
                                                                 None, state)]))""",
             ("tests/serve/test_server.py::test_streams_that_end_at_end_of_text",)),
    # ---------------------------------------------------------------------------- flat layout
    Mutation("row-start-token-to-previous-row", "flat layout offsets",
             "dendrite_jax/cache/kv.py",
             'token_seq = jnp.searchsorted(jnp.cumsum(rows.q_lens), t, side="right")',
             'token_seq = jnp.searchsorted(jnp.cumsum(rows.q_lens), t, side="left")',
             ("tests/cache/test_kv.py",)),
    Mutation("block-position-ignores-block-size", "flat layout offsets",
             "kernels_pallas/paged_attention/ragged.py",
             "first_pos = seq_lens[row] - q_lens[row] + j * block_q",
             "first_pos = seq_lens[row] - q_lens[row] + j",
             ("tests/kernels/test_ragged.py",
              "tests/kernels/test_paged_attention_reference.py::test_random_ragged_batches")),
    Mutation("logits-of-each-rows-first-token", "flat layout offsets", STEP,
             "last_token = jnp.maximum(jnp.cumsum(plan.q_lens) - 1, 0)",
             "last_token = jnp.cumsum(plan.q_lens) - plan.q_lens",
             (GOLDEN_SAMPLING,)),
    # ---------------------------------------------------------------------------- KV tail
    Mutation("tail-ring-rotated-by-one", "full-precision tail",
             "kernels_pallas/paged_attention/tail.py",
             "order = 1 + jnp.mod(jnp.arange(window)[None, :] - tokens.ends[:, None], window)",
             "order = 1 + jnp.mod(jnp.arange(window)[None, :] - tokens.ends[:, None] + 1, "
             "window)",
             ("tests/kernels/test_paged_attention_tail.py::"
              "test_fp8_pages_with_a_tail_attend_exactly_to_the_sink_and_window[reference-None]",)),
    # ---------------------------------------------------------------------------- experts
    Mutation("expert-weights-in-token-order", "mixture of experts",
             "dendrite_jax/model/moe.py",
             "per_copy = y[jnp.argsort(order)].reshape(num_tokens, top_k, -1)",
             "per_copy = y.reshape(num_tokens, top_k, -1)",
             ("tests/model/test_moe.py",)),
    Mutation("router-weights-never-renormalised", "mixture of experts",
             "dendrite_jax/model/llama.py",
             "normalize=cfg.norm_topk_prob)",
             "normalize=False)",
             ("tests/model/test_hf_families.py::test_logits_match_transformers[qwen3-moe]",)),
)
