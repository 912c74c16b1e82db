"""Bucket policy: the few step shapes an engine ever compiles.

A step's token count is rounded up to a power of two (`StepShape.num_tokens`), its row count
follows from it, and the page table always has its full width, so the shape set is a short
ladder of token counts times a few variants:

- decode-only steps (every row one token): `num_tokens` = rows, a power of two from
  `min_decode_rows` up to `max_num_seqs` rounded up; each with and without the logit sort,
  and as a burst of decode steps (without the sort) where bursts are on;
- mixed steps (any prefill chunk): a power of two from `MIN_MIXED_TOKENS` up to the token
  budget rounded up, `min(max_num_seqs, num_tokens)` rows; with and without the sort (a sort
  of every row's vocabulary is a sizeable part of a greedy prefill step);
- prompt-logprob steps: mixed steps that also score every input token, on a sparser ladder
  (`prompt_logprob_ladder`), always sorted.

`all_shapes` enumerates the set for warm-up (`longest_first` orders it for the compile pool);
`bucket_shape` picks a step's member of it; `prefill_to_fit` lets the scheduler size a mixed
step to a rung rather than pad it.
"""

from __future__ import annotations

from dendrite_jax.engine.step_plan import StepShape

MIN_MIXED_TOKENS = 16  # the smallest step with prefill rows (the GPU prefill kernel's tile)
PAD_SLACK = 0.1  # the padding a mixed step may carry, as a fraction of its tokens, rather than wait
# Steps below this many tokens are bound by reading the weights, not by compute (a bf16 step on
# a Hopper GPU turns compute-bound near 300 tokens): padding them costs little, a cut chunk
# costs its request a step.
CUT_MIN_TOKENS = 256


def decode_rows_floor(platform: str, fp8_kernel: bool = False) -> int:
    """The fewest decode rows a step has on this platform.

    On a GPU, 2: a one-row step makes every projection a vector-matrix product, which XLA's GPU
    compiler rewrites as multiply + reduce when the matrix is small (under 10M elements: the 1B
    shape's q/k/v and o), which streams the weights at about half a GEMM's bandwidth; a
    padding row keeps every step a matrix product at no weight traffic.
    But 1 where the projections are FP8 weights read by the GPU kernel (`fp8_kernel`): its
    one-row variant (`Fp8Tuning.gemv`) streams the weights faster than its tensor-core path,
    which a second row would select. Elsewhere 1: on a CPU the padding row is real compute and
    slows a small model's batch-1 step.
    """
    return 2 if platform == "gpu" and not fp8_kernel else 1


def next_power_of_two(n: int, minimum: int = 1) -> int:
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def token_cap(max_num_batched_tokens: int) -> int:
    """The largest step's token count."""
    return next_power_of_two(max_num_batched_tokens, MIN_MIXED_TOKENS)


def decode_ladder(max_num_seqs: int, min_decode_rows: int) -> list[int]:
    top = next_power_of_two(max_num_seqs, min_decode_rows)
    return [t for t in (1 << i for i in range(top.bit_length())) if min_decode_rows <= t]


def mixed_ladder(max_num_batched_tokens: int) -> list[int]:
    cap = token_cap(max_num_batched_tokens)
    return [t for t in (1 << i for i in range(cap.bit_length())) if t >= MIN_MIXED_TOKENS]


def prefill_to_fit(num_decode: int, num_prefill: int, max_num_batched_tokens: int) -> int:
    """How many of `num_prefill` schedulable prefill tokens a step beside `num_decode` decode
    tokens computes: all of them where the step's rung pads them by at most PAD_SLACK, else
    what fills the rung below exactly (the rest wait for the next step), where that rung has
    at least CUT_MIN_TOKENS and leaves a prefill token. Padding a compute-bound step is time
    every running request waits; cutting a chunk delays its request's first token a step."""
    total = num_decode + num_prefill
    ladder = mixed_ladder(max_num_batched_tokens)
    rung = min((t for t in ladder if t >= total), default=total)
    if num_prefill == 0 or rung <= total * (1 + PAD_SLACK):
        return num_prefill
    below = max((t for t in ladder if t < total), default=0)
    if below < CUT_MIN_TOKENS or below <= num_decode:
        return num_prefill
    return below - num_decode


def prompt_logprob_ladder(max_num_batched_tokens: int) -> list[int]:
    """Token counts of prompt-logprob steps: the cap and every eighth of it down to
    MIN_MIXED_TOKENS (prompt logprobs are rare: a step pads further rather than add shapes)."""
    ladder, t = [], token_cap(max_num_batched_tokens)
    while t >= MIN_MIXED_TOKENS:
        ladder.append(t)
        t //= 8
    if ladder[-1] > MIN_MIXED_TOKENS and ladder[-1] // 8 < MIN_MIXED_TOKENS:
        ladder.append(MIN_MIXED_TOKENS)
    return sorted(ladder)


def mixed_rows(num_tokens: int, max_num_seqs: int) -> int:
    return min(max_num_seqs, num_tokens)


def bucket_shape(num_tokens: int, num_rows: int, *, decode_only: bool, max_num_seqs: int,
                 max_num_batched_tokens: int, pages_per_seq: int, prompt_logprobs: bool = False,
                 needs_sort: bool = False, min_decode_rows: int = 1,
                 burst: int = 1) -> StepShape:
    """The shape for a step of `num_tokens` tokens over `num_rows` rows. `decode_only`: every
    row computes one token (token r is row r's)."""
    if decode_only and not prompt_logprobs:
        if burst > 1 and needs_sort:
            raise ValueError("a burst has no rows that need the logit sort")
        t = next_power_of_two(num_rows, min_decode_rows)
        return StepShape(t, t, pages_per_seq, decode_only=True, needs_sort=needs_sort,
                         burst=burst)
    if burst > 1:
        raise ValueError("a burst is for decode-only steps without prompt logprobs")
    cap = token_cap(max_num_batched_tokens)
    if num_tokens > cap or num_rows > max_num_seqs:
        raise ValueError(f"a step of {num_tokens} tokens over {num_rows} rows exceeds "
                         f"max_num_batched_tokens={max_num_batched_tokens} or "
                         f"max_num_seqs={max_num_seqs}")
    if prompt_logprobs:
        t = min(x for x in prompt_logprob_ladder(max_num_batched_tokens) if x >= num_tokens)
        needs_sort = True
    else:
        t = next_power_of_two(num_tokens, MIN_MIXED_TOKENS)
    return StepShape(t, mixed_rows(t, max_num_seqs), pages_per_seq,
                     prompt_logprobs=prompt_logprobs, needs_sort=needs_sort)


def all_shapes(*, max_num_seqs: int, max_num_batched_tokens: int, pages_per_seq: int,
               min_decode_rows: int = 1, burst: int = 1) -> list[StepShape]:
    """Every shape `bucket_shape` can produce (bursts of `burst` steps, if > 1)."""
    shapes = set()
    for t in decode_ladder(max_num_seqs, min_decode_rows):
        for needs_sort in (False, True):
            shapes.add(StepShape(t, t, pages_per_seq, decode_only=True, needs_sort=needs_sort))
        if burst > 1:
            shapes.add(StepShape(t, t, pages_per_seq, decode_only=True, burst=burst))
    for t in mixed_ladder(max_num_batched_tokens):
        for needs_sort in (False, True):
            shapes.add(StepShape(t, mixed_rows(t, max_num_seqs), pages_per_seq,
                                 needs_sort=needs_sort))
    for t in prompt_logprob_ladder(max_num_batched_tokens):
        shapes.add(StepShape(t, mixed_rows(t, max_num_seqs), pages_per_seq,
                             prompt_logprobs=True, needs_sort=True))
    return sorted(shapes)


def compile_cost_rank(shape: StepShape) -> tuple:
    """A sort key that grows with how long `shape`'s program takes to compile: prompt-logprob
    steps, then mixed steps (both attention kernels), then decode steps, each larger first."""
    return (shape.prompt_logprobs, not shape.decode_only, shape.num_tokens, shape.needs_sort,
            shape.burst)


def longest_first(shapes: list[StepShape]) -> list[StepShape]:
    """`shapes` in the order a pool of compile threads should start them: the longest first,
    so that the pool's last programs are short ones and no long program compiles alone at
    the end while the other threads idle."""
    return sorted(shapes, key=compile_cost_rank, reverse=True)
