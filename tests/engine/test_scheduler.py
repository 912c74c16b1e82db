"""The scheduler's step sizing: prefill that would pad a compute-bound step past `PAD_SLACK`
is cut to fill the rung below exactly (`buckets.prefill_to_fit`), across requests, and the rest
of the prompt follows in the next step."""

from __future__ import annotations

from dendrite_jax.cache.pool import PagePool
from dendrite_jax.engine.kv_blocks import KVBlockManager
from dendrite_jax.engine.request import Request
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.scheduler import Scheduler


def request(i: int, prompt_len: int) -> Request:
    return Request(str(i), None, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4),
                   0, 4096, None, ())


def scheduler() -> Scheduler:
    blocks = KVBlockManager(PagePool(256, headroom_fraction=0), 16)
    return Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=512)


def advance(batch) -> None:
    for r, n in batch.rows:
        r.num_computed += n


def test_a_prefill_that_would_pad_far_is_cut_to_the_rung_below():
    s = scheduler()
    r = request(0, 300)  # 300 tokens would run as a 512-token step
    s.add(r)
    first = s.schedule()
    assert [(x, n) for x, n in first.rows] == [(r, 256)]
    advance(first)
    assert [(x, n) for x, n in s.schedule().rows] == [(r, 44)]


def test_the_cut_falls_on_the_last_request():
    s = scheduler()
    a, b = request(0, 200), request(1, 150)  # 350 tokens: cut to 256
    s.add(a)
    s.add(b)
    assert [(x, n) for x, n in s.schedule().rows] == [(a, 200), (b, 56)]


def test_small_padding_is_kept_rather_than_cut():
    s = scheduler()
    r = request(0, 470)  # pads to 512 by under 10%: one step
    s.add(r)
    assert [(x, n) for x, n in s.schedule().rows] == [(r, 470)]
