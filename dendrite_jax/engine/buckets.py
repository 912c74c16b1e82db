"""Bucket policy: round a step's sizes up to powers of two so few shapes ever compile."""

from __future__ import annotations

from dendrite_jax.engine.step_plan import StepShape

MIN_TOKENS = 16
MIN_PAGES = 4


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def bucket_shape(q_lens: list[int], context_pages: list[int], *, max_num_seqs: int,
                 max_pages_per_seq: int, prompt_logprobs: bool) -> StepShape:
    """The bucket for a step whose rows have these query lengths and page counts."""
    decode_only = max(q_lens) == 1
    num_seqs = min(next_power_of_two(len(q_lens)), next_power_of_two(max_num_seqs))
    num_seqs = max(num_seqs, len(q_lens))
    if decode_only:
        num_tokens, max_q_len = num_seqs, 1
    else:
        num_tokens = next_power_of_two(sum(q_lens), MIN_TOKENS)
        max_q_len = min(next_power_of_two(max(q_lens), MIN_TOKENS), num_tokens)
    pages = min(next_power_of_two(max(context_pages), MIN_PAGES),
                next_power_of_two(max_pages_per_seq))
    pages = max(pages, max(context_pages))
    return StepShape(num_tokens=num_tokens, num_seqs=num_seqs, pages_per_seq=pages,
                     max_q_len=max_q_len, prompt_logprobs=prompt_logprobs)
