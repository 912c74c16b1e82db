"""The Pallas paged-attention kernels against the pure-JAX reference on random ragged batches:
the GPU kernels (Triton lowering) compiled on a GPU and in interpret mode elsewhere, the TPU
kernel in TPU interpret mode (which fills uninitialised memory with NaNs, so an unwritten
output or a read of an unfetched page fails the comparison)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import (
    BACKENDS,
    gpu,
    reference_ragged_paged_attention,
    resolve_backend,
    tpu,
    write_and_attend,
)
from tests.kernels.paged_attention_cases import make_case, token_slots

KERNELS = {
    "pallas_gpu": functools.partial(gpu.ragged_paged_attention,
                                    interpret=jax.default_backend() != "gpu"),
    "pallas_tpu": functools.partial(tpu.ragged_paged_attention, interpret=True),
}
# float32 end to end (interpret mode, or the GPU's float32 dot without TF32): the kernels'
# online softmax and split merging differ from the reference's one-pass softmax by rounding.
RTOL, ATOL = 2e-5, 2e-5

kernel_names = pytest.mark.parametrize("kernel", sorted(KERNELS))


def check(kernel: str, case, **tuning) -> None:
    inputs, expected, valid = case
    ref = np.asarray(reference_ragged_paged_attention(**inputs))
    out = np.asarray(KERNELS[kernel](**inputs, **tuning))
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert np.all(out[~valid] == 0)  # padding query slots and empty rows give zeros


# Every case lies on one flat token axis (`ragged`): decode rows, full prefills and prefill
# chunks in the order given, then padding rows and tokens.
STEPS = [
    # decode-only step (token r is row r's): decodes straddling a page boundary (page 16)
    pytest.param([1, 1, 1], [15, 16, 17], None, id="decode-only"),
    # decode-only with a row of context but no token between decodes, as a step may have
    pytest.param([1, 0, 1, 1], [15, 40, 16, 33], True, id="decode-only-gap"),
    # one-token rows on a mixed step's axis (prompts' last single-token chunks)
    pytest.param([1, 1, 1], [15, 16, 17], False, id="single-tokens-mixed"),
    # ragged mix: full prefill, decode, chunk, decode
    pytest.param([13, 1, 5, 1], [13, 70, 21, 33], None, id="mix"),
    # unsorted mix: full prefill, decode, chunk deep into a long context, decode, chunk
    pytest.param([5, 1, 13, 1, 3], [5, 150, 120, 47, 200], None, id="mix-unsorted-long"),
    # a chunk of more than one prefill block (64 queries) deep into its context, a row of
    # context without tokens, among decodes and a full prefill
    pytest.param([3, 1, 70, 0, 1, 2], [3, 150, 200, 60, 47, 220], None, id="mix-multi-block"),
    # prompt exactly filling a page; chunk deep into a context
    pytest.param([16, 32], [16, 100], None, id="prefill-only"),
]


@kernel_names
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", STEPS)
def test_matches_reference(kernel, q_lens, ctx_lens, decode_only):
    rng = np.random.default_rng(sum(ctx_lens))
    case = make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=16, num_heads=8,
                     num_kv_heads=2, pad_decode=2, pad_prefill=1, decode_only=decode_only)
    assert case[0]["rows"].decode_only == (decode_only is not False and max(q_lens) == 1)
    check(kernel, case)


# The default run keeps the group-of-3 geometry; the other two run with `make test-slow` (the
# default run must fit 20 minutes cold).
@kernel_names
@pytest.mark.parametrize("page_size,head_dim,num_heads,num_kv_heads", [
    pytest.param(32, 128, 4, 1, marks=pytest.mark.slow),
    pytest.param(128, 64, 4, 1, marks=pytest.mark.slow), (64, 128, 9, 3)])
def test_page_sizes_head_dims_and_groups(kernel, page_size, head_dim, num_heads, num_kv_heads):
    rng = np.random.default_rng(page_size + num_heads)
    check(kernel, make_case(rng, [1, 20, 1], [200, 60, 129], head_dim=head_dim,
                            page_size=page_size, num_heads=num_heads,
                            num_kv_heads=num_kv_heads))


@kernel_names
def test_sliding_window_and_soft_cap(kernel):
    rng = np.random.default_rng(7)
    check(kernel, make_case(rng, [24, 1, 1], [60, 75, 9], head_dim=64, page_size=16,
                            num_heads=4, num_kv_heads=2, sliding_window=21, soft_cap=5.0))


@kernel_names
def test_random_ragged_batches(kernel):
    """Random flat axes: decode rows, prefill chunks of odd lengths and rows of context without
    tokens in random order, padding rows and tokens; the first batch is a decode-only step."""
    rng = np.random.default_rng(2026)
    for i in range(4):
        n = int(rng.integers(1, 6))
        decode_only = i == 0
        q_lens = [int(x) for x in rng.choice([0, 1, 1] if decode_only
                                             else [0, 1, 1, 2, 7, 19, 33], n)]
        if not decode_only and not any(q_lens):
            q_lens[0] = 2
        ctx_lens = [q + int(rng.integers(0, 90)) for q in q_lens]
        check(kernel, make_case(rng, q_lens, ctx_lens, head_dim=64,
                                page_size=int(rng.choice([16, 32])), num_heads=6,
                                num_kv_heads=2, pad_decode=int(rng.integers(0, 3)),
                                pad_prefill=int(rng.integers(0, 3)), decode_only=decode_only))


@kernel_names
def test_bfloat16(kernel):
    """bf16 cache and queries: relative error of the whole output within bf16's range."""
    rng = np.random.default_rng(11)
    inputs, _, valid = make_case(rng, [1, 17, 1], [50, 40, 120], head_dim=64, page_size=16,
                                 num_heads=8, num_kv_heads=2)
    for name in ("q", "k_pages", "v_pages"):
        inputs[name] = jnp.asarray(inputs[name], jnp.bfloat16)
    ref = np.asarray(reference_ragged_paged_attention(**inputs), np.float32)[valid]
    out = np.asarray(KERNELS[kernel](**inputs), np.float32)[valid]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-2


def test_gpu_context_splits_and_small_blocks():
    """Several splits per row, some empty (short rows), blocks of one page."""
    rng = np.random.default_rng(3)
    case = make_case(rng, [1, 1, 1, 40], [3, 90, 130, 70], head_dim=64, page_size=16,
                     num_heads=9, num_kv_heads=3)
    check("pallas_gpu", case,
          decode_tuning=gpu.DecodeTuning(pages_per_block=1, num_splits=4),
          prefill_tuning=gpu.PrefillTuning(block_q=16, block_k=16))


def test_gpu_window_across_splits_and_blocks():
    rng = np.random.default_rng(7)
    check("pallas_gpu", make_case(rng, [24, 1, 1], [60, 75, 9], head_dim=64, page_size=16,
                                  num_heads=4, num_kv_heads=2, sliding_window=21, soft_cap=5.0),
          decode_tuning=gpu.DecodeTuning(pages_per_block=2, num_splits=2),
          prefill_tuning=gpu.PrefillTuning(block_q=16, block_k=32))


def test_dispatch():
    assert resolve_backend("auto", "gpu") == "pallas_gpu"
    assert resolve_backend("auto", "tpu") == "pallas_tpu"
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("pallas_gpu", "cpu") == "pallas_gpu"  # interpret mode, not a fallback
    assert set(BACKENDS) == {"auto", "reference", "pallas_gpu", "pallas_tpu"}
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        resolve_backend("triton")


def split_new_tokens(inputs: dict, valid: np.ndarray) -> dict:
    """The case as a step that still has to write its tokens: each query token's K/V is taken
    out of its slot (which is overwritten with NaN-free junk) and passed as the new k, v;
    padding tokens carry junk too, and a slot page outside the cache."""
    pages, offsets, real = token_slots(inputs)
    np.testing.assert_array_equal(real, valid)
    layer = int(inputs["layer"])
    out = dict(inputs, slot_pages=pages, slot_offsets=offsets)
    new = {}
    for name in ("k_pages", "v_pages"):
        cache = inputs[name].copy()
        new[name] = np.full((len(valid),) + cache.shape[3:], 3.0, np.float32)
        new[name][valid] = cache[layer, pages[valid], offsets[valid]]
        cache[layer, pages[valid], offsets[valid]] = 7.0  # the step must overwrite these
        out[name] = cache
    out.update(k=new["k_pages"], v=new["v_pages"])
    return {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in out.items()}


WRITE_STEPS = [
    # decode-only: decodes at a page's end and start, a one-token prompt, a gap row
    pytest.param([1, 1, 0, 1], [15, 16, 30, 1], True, id="decode-only"),
    # decode rows and prefill chunks in one step
    pytest.param([13, 1, 5, 1], [13, 70, 21, 33], None, id="mix"),
    # unsorted: full prefill, decodes and chunks deep into long contexts
    pytest.param([5, 1, 13, 1, 3], [5, 150, 120, 47, 200], None, id="mix-unsorted-long"),
]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", WRITE_STEPS)
def test_write_and_attend(backend, q_lens, ctx_lens, decode_only, monkeypatch):
    """The step's K/V land in their slots (and nowhere else) and attention sees them. On the
    GPU backend a decode-only step is one decode kernel that stores its rows' K/V itself and
    attends to them from registers (no scatter at all); a mixed step scatters first."""
    rng = np.random.default_rng(len(q_lens))
    inputs, expected, valid = make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=16,
                                        num_heads=8, num_kv_heads=2, pad_decode=1,
                                        decode_only=decode_only)
    step = split_new_tokens(inputs, valid)
    if backend == "pallas_gpu" and step["rows"].decode_only:
        def no_scatter(*args, **kwargs):
            raise AssertionError("a decode-only step's writes belong to the decode kernel")
        monkeypatch.setattr(gpu, "write_pages", no_scatter)
    out, k_pages, v_pages = write_and_attend(**step, backend=backend)
    np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out)[~valid] == 0)
    np.testing.assert_array_equal(np.asarray(k_pages), inputs["k_pages"])
    np.testing.assert_array_equal(np.asarray(v_pages), inputs["v_pages"])
    if backend != "reference":  # the same step through the reference write + attend
        ref, ref_k, ref_v = write_and_attend(**step, backend="reference")
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(np.asarray(k_pages), np.asarray(ref_k))
        np.testing.assert_array_equal(np.asarray(v_pages), np.asarray(ref_v))
