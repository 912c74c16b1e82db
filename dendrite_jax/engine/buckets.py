"""Bucket policy: round a step's sizes up to powers of two so few shapes ever compile.

A step has `num_decode` one-token rows and `num_prefill` rows padded to `max_q_len`
(see `step_plan`). Each count is a power of two (or 0), the decode count at least
`min_decode_rows` (`decode_rows_floor`), `max_q_len` a power of two of at least MIN_Q_LEN, the
prefill block at most `token_cap` tokens, and the page-table width a power of two of at least
MIN_PAGES. `all_shapes` enumerates the set for warm-up.
"""

from __future__ import annotations

import itertools

from dendrite_jax.engine.step_plan import StepShape

MIN_Q_LEN = 16
MIN_PAGES = 4


def decode_rows_floor(platform: str, fp8_kernel: bool = False) -> int:
    """The fewest decode rows a step has on this platform.

    On a GPU, 2: a one-row step makes every projection a vector-matrix product, which XLA's GPU
    compiler rewrites as multiply + reduce when the matrix is small (under 10M elements: the 1B
    shape's q/k/v and o), measured on an H100 at ~1.2 TB/s against ~2.5 TB/s as a GEMM (the o
    projection even wrote its [2048, 2048] product out first); a padding row keeps every step a
    matrix product at no weight traffic. But 1 where the projections are FP8 weights read by the
    GPU kernel (`fp8_kernel`): its one-row variant (`Fp8Tuning.gemv`) streams the weights
    faster than its tensor-core path, which a second row would select. Elsewhere 1: on CPU the
    second row cost SmolLM2 ~20% at batch 1.
    """
    return 2 if platform == "gpu" and not fp8_kernel else 1


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def _count_bucket(n: int, minimum: int = 1) -> int:
    return 0 if n == 0 else next_power_of_two(n, minimum)


def bucket_shape(num_decode: int, prefill_lens: list[int], context_pages: int, *,
                 max_pages_per_seq: int, prompt_logprobs: bool, needs_sort: bool = False,
                 bucket_pages: bool = True, min_decode_rows: int = 1,
                 burst: int = 1) -> StepShape:
    """The bucket for `num_decode` decode rows, prefill rows of these lengths, and a widest
    row of `context_pages` pages. Without `bucket_pages` the page table always has its full
    width: kernels that stop at each row's length pay nothing for it, and it divides the
    number of shapes by the number of page buckets."""
    max_q_len = next_power_of_two(max(prefill_lens), MIN_Q_LEN) if prefill_lens else 1
    widest = widest_pages(max_pages_per_seq)
    pages = min(next_power_of_two(context_pages, MIN_PAGES), widest) if bucket_pages else widest
    return StepShape(num_decode=_count_bucket(num_decode, min_decode_rows),
                     num_prefill=_count_bucket(len(prefill_lens)), max_q_len=max_q_len,
                     pages_per_seq=max(pages, context_pages), prompt_logprobs=prompt_logprobs,
                     needs_sort=needs_sort, burst=burst)


def widest_pages(max_pages_per_seq: int) -> int:
    """The widest page-table bucket (the full width the kernel backends always use)."""
    return next_power_of_two(max_pages_per_seq, MIN_PAGES)


def token_cap(max_num_batched_tokens: int) -> int:
    """The most padded prefill-block tokens a step may have."""
    return next_power_of_two(max_num_batched_tokens, MIN_Q_LEN)


def all_shapes(*, max_num_seqs: int, max_num_batched_tokens: int, max_pages_per_seq: int,
               bucket_pages: bool = True, min_decode_rows: int = 1,
               burst: int = 1) -> list[StepShape]:
    """Every bucket the scheduler can produce (prompt-logprob and sorting variants included,
    and with `burst` > 1 the decode-only shapes' bursts)."""
    cap = token_cap(max_num_batched_tokens)
    counts = [0] + [1 << i for i in range(next_power_of_two(max_num_seqs).bit_length())]
    q_lens = [q for q in (1 << i for i in range(cap.bit_length())) if MIN_Q_LEN <= q <= cap]
    widest = widest_pages(max_pages_per_seq)
    pages = [p for p in (1 << i for i in range(widest.bit_length()))
             if MIN_PAGES <= p <= widest] if bucket_pages else [widest]
    decode_counts = sorted({_count_bucket(n, min_decode_rows) for n in counts})
    shapes = set()
    flags = (False, True)
    for num_decode, num_prefill, p, lp, srt in itertools.product(decode_counts, counts, pages,
                                                                 flags, flags):
        if num_prefill == 0:
            if num_decode:
                shapes.add(StepShape(num_decode, 0, 1, p, lp, srt))
                if burst > 1 and not lp:
                    shapes.add(StepShape(num_decode, 0, 1, p, lp, srt, burst))
            continue
        for q in q_lens:
            if num_prefill * q <= cap:
                shapes.add(StepShape(num_decode, num_prefill, q, p, lp, srt))
    return sorted(shapes)
