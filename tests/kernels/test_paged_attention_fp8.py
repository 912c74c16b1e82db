"""FP8 pages (E4M3, centred and scaled per (layer, KV head, channel)) through every attention
backend: a ragged step writing its keys and values as FP8 and attending equals float32 attention
over the same values dequantized (the pages hold exactly the quantized step), on heads and
channels of very different scales and offsets; values past the range saturate instead of
turning NaN."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import write_and_attend
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE, FP8_MAX, Fp8Calibration, quantize
from tests.kernels.paged_attention_cases import make_case, token_slots
from tests.kernels.test_paged_attention_kernels import WRITE_STEPS, split_new_tokens

HEAD_SCALES = np.array([0.02, 40.0])  # two KV heads, typical magnitudes 2,000x apart
HEAD_OFFSETS = np.array([0.05, -60.0])  # and a shared direction of each head's vectors


def fp8_pages(pages: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 pages [L, N, P, Hkv, hd] quantized per layer and head."""
    return np.stack([np.asarray(quantize(jnp.asarray(x.reshape(-1, *x.shape[2:])),
                                         jnp.asarray(m), jnp.asarray(s))).reshape(x.shape)
                     for x, m, s in zip(pages, mean, scale, strict=True)])


def dequantized(pages: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return pages.astype(np.float32) * scale[:, None, None] + mean[:, None, None]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", WRITE_STEPS)
def test_fp8_pages_attend_as_their_dequantized_values(backend, q_lens, ctx_lens, decode_only):
    rng = np.random.default_rng(len(q_lens) + 7)
    inputs, _, valid = make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=16, num_heads=8,
                                 num_kv_heads=2, pad_decode=1, decode_only=decode_only)
    step = split_new_tokens(inputs, valid)
    layers, _, _, heads, head_dim = step["k_pages"].shape
    direction = rng.standard_normal((heads, head_dim)) / np.sqrt(head_dim)
    offset = HEAD_OFFSETS[:, None] * direction  # each head's common component
    cal = {}
    # channels of a head 400x apart in magnitude (outlier channels beside small ones)
    magnitude = HEAD_SCALES[:, None] * np.exp(np.linspace(-3, 3, head_dim))[None]
    for n, f in (("k", 3.0), ("v", 2.0)):
        cal[n] = (np.tile(offset, (layers, 1, 1)).astype(np.float32),
                  np.tile(magnitude * f * 4 / 448, (layers, 1, 1)).astype(np.float32))
    new = {n: np.asarray(step[n]) * magnitude + offset for n in ("k", "v")}
    pages = {n: fp8_pages(np.asarray(step[n + "_pages"]) * magnitude + offset, *cal[n])
             for n in ("k", "v")}
    layer = int(step["layer"])
    calibration = Fp8Calibration(k_mean=jnp.asarray(cal["k"][0]), v_mean=jnp.asarray(cal["v"][0]),
                                 k_scale=jnp.asarray(cal["k"][1]),
                                 v_scale=jnp.asarray(cal["v"][1]))
    out, k_pages, v_pages = write_and_attend(
        **dict(step, k=jnp.asarray(new["k"]), v=jnp.asarray(new["v"]),
               k_pages=jnp.asarray(pages["k"]), v_pages=jnp.asarray(pages["v"])),
        backend=backend, fp8_pages=calibration.layer(layer))
    assert k_pages.dtype == v_pages.dtype == FP8_DTYPE
    # the oracle: float32 attention over what the FP8 pages hold after the step's writes
    stored = {"k": dequantized(np.asarray(k_pages), *cal["k"]),
              "v": dequantized(np.asarray(v_pages), *cal["v"])}
    written = {n: np.asarray(quantize(jnp.asarray(new[n]), jnp.asarray(cal[n][0][layer]),
                                      jnp.asarray(cal[n][1][layer]))).astype(np.float32)
               * cal[n][1][layer][None] + cal[n][0][layer][None]
               for n in ("k", "v")}
    want, _, _ = write_and_attend(**dict(
        step, k=jnp.asarray(written["k"]), v=jnp.asarray(written["v"]),
        k_pages=jnp.asarray(stored["k"]), v_pages=jnp.asarray(stored["v"])),
        backend="reference")
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], rtol=2e-4,
                               atol=2e-4 * np.abs(np.asarray(want)).max())
    assert np.all(np.asarray(out)[~valid] == 0)
    # pages hold the step's quantized tokens in their slots, and nothing else changed
    untouched = np.ones(pages["k"].shape[1:3], bool)
    slot_pages, slot_offsets, real = token_slots(inputs)
    untouched[slot_pages[real], slot_offsets[real]] = False
    for n in ("k", "v"):
        np.testing.assert_array_equal(stored[n][layer][slot_pages[real], slot_offsets[real]],
                                      written[n][real])
    for n, got in (("k", k_pages), ("v", v_pages)):
        got = np.asarray(got).astype(np.float32)
        before = pages[n].astype(np.float32)
        np.testing.assert_array_equal(got[layer][untouched], before[layer][untouched])
        assert np.all(np.isfinite(got))


def test_values_past_the_range_saturate():
    scale, mean = jnp.asarray([[1.0, 1.0], [0.001, 0.001]]), jnp.zeros((2, 2))
    x = jnp.asarray([[[1e6, -1e6], [1.0, 0.5]]], jnp.float32)
    q = np.asarray(quantize(x, mean, scale)).astype(np.float32)
    assert np.all(np.isfinite(q))
    np.testing.assert_array_equal(q[0, 0], [FP8_MAX, -FP8_MAX])
    np.testing.assert_array_equal(q[0, 1], [FP8_MAX, FP8_MAX])  # 1000 and 500 > 448


def test_a_soft_cap_is_refused():
    rng = np.random.default_rng(0)
    inputs, _, valid = make_case(rng, [1], [5], head_dim=16)
    step = split_new_tokens(inputs, valid)
    zeros = Fp8Calibration(*(jnp.zeros((2, 16)),) * 2, *(jnp.ones((2, 16)),) * 2)
    with pytest.raises(ValueError, match="soft cap"):
        write_and_attend(**dict(step, soft_cap=30.0), fp8_pages=zeros)
