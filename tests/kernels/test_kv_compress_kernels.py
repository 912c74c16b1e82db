"""The compressed-cache attention kernels (`kernels_pallas.kv_compress`) against the pure-JAX
reference on the same pages of codes: random ragged batches of decode rows and prefill chunks,
page boundaries, padding rows, context splits, sliding window and soft cap, GQA groups, both head
dims, the step's writes. The GPU kernels compiled on a GPU and in Pallas interpret mode
elsewhere; the TPU kernel in TPU interpret mode (which poisons unwritten memory with NaNs)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.cache.compressed_kv import CompressedKVCache
from kernels_pallas import kv_compress
from kernels_pallas.codecs.kv import make_kv_compression
from kernels_pallas.kv_compress import gpu, reference, tpu
from tests.kernels.paged_attention_cases import make_case, token_slots

INTERPRET = jax.default_backend() != "gpu"
# float32 queries: the kernels' online softmax and rotated-domain sums differ from the
# reference's decode-then-attend by float32 rounding only.
RTOL, ATOL = 5e-5, 5e-5


def compressed_case(rng, q_lens, ctx_lens, compression: str, **kwargs):
    """A random ragged batch whose pages are stored as `compression` codes, centred on random
    per-(layer, head) means (so the kernels' mean handling is exercised)."""
    inputs, _, valid = make_case(rng, q_lens, ctx_lens, **kwargs)
    k, v = jnp.asarray(inputs.pop("k_pages")), jnp.asarray(inputs.pop("v_pages"))
    layers, num_pages, page_size, num_kv_heads, head_dim = k.shape
    cfg = dataclasses.make_dataclass("Shape", ["num_layers", "num_kv_heads", "head_dim"])(
        layers, num_kv_heads, head_dim)
    means = tuple(jnp.asarray(rng.standard_normal((layers, num_kv_heads, head_dim)) * 0.5,
                              jnp.float32) for _ in range(2))
    kv = CompressedKVCache.create(cfg, num_pages, page_size, compression, means=means)
    kv = dataclasses.replace(kv, k=kv.key_compressor.encode(k - means[0][:, None, None]),
                             v=kv.value_compressor.encode(v - means[1][:, None, None]))
    inputs = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x
              for name, x in inputs.items()}
    return inputs, kv, valid


def oracle(inputs, kv) -> np.ndarray:
    """The reference in full float32 (XLA would run its float32 matmuls in TF32 on a GPU)."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(reference.ragged_paged_attention(kv=kv, **inputs), np.float32)


def check(inputs, kv, valid, rtol=RTOL, atol=ATOL, **tuning) -> None:
    ref = oracle(inputs, kv)
    out = np.asarray(gpu.ragged_paged_attention(kv=kv, **inputs, interpret=INTERPRET,
                                                tuning=gpu.CodeTuning(**tuning)))
    np.testing.assert_allclose(out[valid], ref[valid], rtol=rtol, atol=atol)
    assert np.all(out[~valid] == 0)  # padding query slots and empty rows give zeros


compressions = pytest.mark.parametrize("compression",
                                       ["turboquant-4", "turboquant-mse-4", "turboquant-3"])


@compressions
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", [
    # decode-only step: decodes straddling a page boundary (page 16), a row without a token
    pytest.param([1, 1, 0, 1], [15, 16, 40, 17], True, id="decode-only"),
    # ragged mix: full prefill, decode, chunk, decode
    pytest.param([13, 1, 5, 1], [13, 70, 21, 33], None, id="mix"),
    # unsorted mix: full prefill, decode, chunk deep into a long context, decode, chunk
    pytest.param([5, 1, 13, 1, 3], [5, 150, 120, 47, 200], None, id="mix-unsorted-long"),
])
def test_matches_reference(compression, q_lens, ctx_lens, decode_only):
    rng = np.random.default_rng(sum(ctx_lens))
    check(*compressed_case(rng, q_lens, ctx_lens, compression, head_dim=64, page_size=16,
                           num_heads=8, num_kv_heads=2, pad_decode=2, pad_prefill=1,
                           decode_only=decode_only))


def test_prefill_chunk_of_several_blocks():
    """A chunk of more than one prefill block (64 queries) deep into its context, among
    decodes, a row of context without tokens and a full prefill."""
    rng = np.random.default_rng(70)
    inputs, kv, valid = compressed_case(rng, [3, 1, 70, 0, 1], [3, 150, 200, 60, 47],
                                        "turboquant-4", head_dim=64, page_size=16,
                                        num_heads=4, num_kv_heads=2)
    assert int((np.asarray(inputs["rows"].block_q_lens) > 0).sum()) == 3
    check(inputs, kv, valid)


# The default run keeps one geometry (a group of 3, head_dim 64); the other two, 12 s each
# interpreted, run with `make test-slow` (the default run must fit 20 minutes cold).
@pytest.mark.parametrize("page_size,head_dim,num_heads,num_kv_heads", [
    pytest.param(32, 128, 4, 1, marks=pytest.mark.slow),
    pytest.param(8, 128, 8, 2, marks=pytest.mark.slow), (16, 64, 9, 3)])
def test_page_sizes_head_dims_and_groups(page_size, head_dim, num_heads, num_kv_heads):
    rng = np.random.default_rng(page_size + num_heads)
    check(*compressed_case(rng, [1, 20, 1], [90, 60, 129], "turboquant-4", head_dim=head_dim,
                           page_size=page_size, num_heads=num_heads,
                           num_kv_heads=num_kv_heads))


@pytest.mark.parametrize("splits,pages_per_block", [(1, 1), (2, 2), (4, 1)])
def test_context_splits(splits, pages_per_block):
    rng = np.random.default_rng(splits)
    check(*compressed_case(rng, [1, 1, 1, 1], [200, 3, 64, 129], "turboquant-4", head_dim=64,
                           page_size=16, num_heads=4, num_kv_heads=2),
          num_splits=splits, pages_per_block=pages_per_block)


def test_sliding_window_and_soft_cap():
    rng = np.random.default_rng(7)
    check(*compressed_case(rng, [24, 1, 1], [60, 75, 9], "turboquant-4", head_dim=64,
                           page_size=16, num_heads=4, num_kv_heads=2, sliding_window=21,
                           soft_cap=5.0))


def test_bfloat16_queries():
    """The engine's dtype: grid values and queries enter the tensor cores in bfloat16."""
    rng = np.random.default_rng(11)
    inputs, kv, valid = compressed_case(rng, [1, 9, 1], [80, 40, 17], "turboquant-4",
                                        head_dim=128, page_size=16, num_heads=8,
                                        num_kv_heads=2)
    inputs["q"] = inputs["q"].astype(jnp.bfloat16)
    ref = oracle(inputs, kv)
    out = np.asarray(gpu.ragged_paged_attention(kv=kv, **inputs, interpret=INTERPRET),
                     np.float32)
    scale = np.abs(ref[valid]).max()
    assert np.abs(out[valid] - ref[valid]).max() < 0.03 * scale


@pytest.mark.parametrize("backend,compression", [("pallas_gpu", "turboquant-4"),
                                                 ("pallas_tpu", "turboquant-mse-4")])
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", [
    pytest.param([1, 0, 1, 1], [33, 20, 16, 1], True, id="decode-only"),
    pytest.param([1, 7, 1, 2], [33, 20, 16, 70], None, id="mix"),
])
def test_write_and_attend_matches_reference(backend, compression, q_lens, ctx_lens,
                                            decode_only):
    """The step's new keys/values are encoded into their slots identically, and the kernels
    read them back with the rest of the context; padding tokens write nowhere."""
    rng = np.random.default_rng(3)
    inputs, kv, valid = compressed_case(rng, q_lens, ctx_lens, compression, head_dim=64,
                                        page_size=16, num_heads=4, num_kv_heads=2,
                                        decode_only=decode_only)
    tokens = inputs["q"].shape[0]
    k = jnp.asarray(rng.standard_normal((tokens, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((tokens, 2, 64)), jnp.float32)
    # Each real token writes its own slot (its position in its row); padding writes nowhere.
    slot_pages, slot_offsets, real = token_slots(dict(inputs, k_pages=kv.k["norm"]))
    np.testing.assert_array_equal(real, valid)
    args = dict(q=inputs["q"], k=k, v=v, kv=kv, layer=inputs["layer"], rows=inputs["rows"],
                slot_pages=jnp.asarray(slot_pages), slot_offsets=jnp.asarray(slot_offsets),
                sm_scale=inputs["sm_scale"])
    with jax.default_matmul_precision("highest"):  # both encode the same codes
        ref, ref_kv = kv_compress.write_and_attend(**args, backend="reference")
        out, out_kv = kv_compress.write_and_attend(**args, backend=backend)
    for a, b in zip(jax.tree.leaves(ref_kv), jax.tree.leaves(out_kv), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Exactly the real tokens' slots changed.
    layer = int(inputs["layer"])
    changed = np.any(np.asarray(ref_kv.k["norm"]) != np.asarray(kv.k["norm"]), axis=-1)
    expected = np.zeros_like(changed)
    expected[layer, slot_pages[valid], slot_offsets[valid]] = True
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], rtol=RTOL,
                               atol=ATOL)
    assert np.all(np.asarray(out)[~valid] == 0)


TPU_CASES = [
    ([1, 1, 1], [15, 16, 17], 64, 16, (8, 2)),  # decode-only: decodes straddling a page
    ([13, 1, 5, 1], [13, 70, 21, 33], 128, 8, (9, 3)),  # ragged mix, a group of 3
    # unsorted mix: full prefill, decodes, chunks deep into long contexts
    ([5, 1, 13, 1, 3], [5, 150, 120, 47, 200], 64, 16, (8, 2)),
]


# Every case at both bit widths; the mixes at 4 bits (16 s interpreted) run with
# `make test-slow` (the default run must fit 20 minutes cold).
@pytest.mark.parametrize("compression,q_lens,ctx_lens,head_dim,page_size,heads", [
    pytest.param(compression, *case, marks=pytest.mark.slow)
    if compression == "turboquant-mse-4" and case is not TPU_CASES[0] else (compression, *case)
    for compression in ("turboquant-mse-4", "turboquant-mse-2") for case in TPU_CASES])
def test_tpu_kernel_matches_reference(compression, q_lens, ctx_lens, head_dim, page_size,
                                      heads):
    rng = np.random.default_rng(len(q_lens) + head_dim)
    inputs, kv, valid = compressed_case(rng, q_lens, ctx_lens, compression, head_dim=head_dim,
                                        page_size=page_size, num_heads=heads[0],
                                        num_kv_heads=heads[1], pad_decode=2, pad_prefill=1)
    out = np.asarray(tpu.ragged_paged_attention(kv=kv, **inputs, interpret=True))
    np.testing.assert_allclose(out[valid], oracle(inputs, kv)[valid], rtol=RTOL, atol=ATOL)
    assert np.all(out[~valid] == 0)


def test_tpu_kernel_sliding_window_and_soft_cap():
    rng = np.random.default_rng(8)
    inputs, kv, valid = compressed_case(rng, [24, 1, 1], [60, 75, 9], "turboquant-mse-4",
                                        head_dim=64, page_size=16, num_heads=4, num_kv_heads=2,
                                        sliding_window=21, soft_cap=5.0)
    out = np.asarray(tpu.ragged_paged_attention(kv=kv, **inputs, interpret=True))
    np.testing.assert_allclose(out[valid], oracle(inputs, kv)[valid], rtol=RTOL, atol=ATOL)


def test_backend_resolution():
    assert kv_compress.resolve_backend("auto", "turboquant-4", 64, platform="gpu") == "pallas_gpu"
    assert kv_compress.resolve_backend("auto", "polarquant-4", 64, platform="gpu") == "reference"
    assert kv_compress.resolve_backend("auto", "turboquant-4", 64, platform="cpu") == "reference"
    assert gpu.kernel_supports(*make_kv_compression("turboquant-mse-3", 128)) is None
    for name in ("polarquant-4", "qjl-256"):
        with pytest.raises(ValueError, match="no kernel for a"):
            kv_compress.resolve_backend("pallas_gpu", name, 128)
    assert kv_compress.resolve_backend("auto", "turboquant-mse-4", 64, platform="tpu") == (
        "pallas_tpu")
    assert kv_compress.resolve_backend("auto", "turboquant-4", 64, platform="tpu") == "reference"
    with pytest.raises(ValueError, match="no kernel for a"):
        kv_compress.resolve_backend("pallas_tpu", "turboquant-4", 128)
    with pytest.raises(ValueError, match="unknown attention backend"):
        kv_compress.resolve_backend("cuda", "turboquant-4", 128)


@pytest.mark.slow  # compile-heavy: `make test-slow` (the default run must fit 20 minutes cold)
def test_engine_tokens_equal_the_reference_backend():
    """The whole engine (prefill chunks, decode steps, code writes) on each kernel backend gives
    the reference backend's greedy tokens on a small random model."""
    base = dict(model="tiny-random", page_size=16, max_num_seqs=4, max_num_batched_tokens=32,
                max_model_len=256, compilation_cache=False, warmup=False,
                kv_compression="turboquant-mse-4")
    prompts = [[(7 * i + j) % 500 + 1 for j in range(n)] for i, n in enumerate((5, 40, 17))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = [[o.token_ids for o in LLM(**base, attention_backend=b).generate(prompts, params)]
            for b in ("reference", "pallas_gpu", "pallas_tpu")]
    assert outs[0] == outs[1] == outs[2]
