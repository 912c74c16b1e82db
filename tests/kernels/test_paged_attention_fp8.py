"""FP8 pages (E4M3, per-(layer, KV head) scales) through every attention backend: a ragged step
writing its keys and values as FP8 and attending equals float32 attention over the same values
dequantized (the pages hold exactly the quantized step), on heads of very different scales;
values past the range saturate instead of turning NaN."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import write_and_attend
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE, FP8_MAX, quantize
from tests.kernels.paged_attention_cases import make_case, token_slots
from tests.kernels.test_paged_attention_kernels import WRITE_STEPS, split_new_tokens

HEAD_SCALES = np.array([0.02, 40.0])  # two KV heads, magnitudes 2,000x apart


def fp8_pages(pages: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 pages [L, N, P, Hkv, hd] quantized per layer and head."""
    return np.stack([np.asarray(quantize(jnp.asarray(layer.reshape(-1, *layer.shape[2:])),
                                         jnp.asarray(s))).reshape(layer.shape)
                     for layer, s in zip(pages, scales, strict=True)])


def dequantized(pages: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return pages.astype(np.float32) * scales[:, None, None, :, None]


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("q_lens,ctx_lens,decode_only", WRITE_STEPS)
def test_fp8_pages_attend_as_their_dequantized_values(backend, q_lens, ctx_lens, decode_only):
    rng = np.random.default_rng(len(q_lens) + 7)
    inputs, _, valid = make_case(rng, q_lens, ctx_lens, head_dim=64, page_size=16, num_heads=8,
                                 num_kv_heads=2, pad_decode=1, decode_only=decode_only)
    step = split_new_tokens(inputs, valid)
    layers = step["k_pages"].shape[0]
    k_scale, v_scale = (np.tile(HEAD_SCALES * f / 448 * 4, (layers, 1)).astype(np.float32)
                        for f in (3.0, 2.0))
    # this step's new keys/values and the pages, at each head's magnitude
    magnitude = HEAD_SCALES[None, :, None]
    new = {n: np.asarray(step[n]) * magnitude for n in ("k", "v")}
    pages = {n: fp8_pages(np.asarray(step[n]) * magnitude[None, None], s)
             for n, s in (("k_pages", k_scale), ("v_pages", v_scale))}
    layer = int(step["layer"])
    out, k_pages, v_pages = write_and_attend(
        **dict(step, k=jnp.asarray(new["k"]), v=jnp.asarray(new["v"]),
               k_pages=jnp.asarray(pages["k_pages"]), v_pages=jnp.asarray(pages["v_pages"])),
        backend=backend, scales=(jnp.asarray(k_scale[layer]), jnp.asarray(v_scale[layer])))
    assert k_pages.dtype == v_pages.dtype == FP8_DTYPE
    # the oracle: float32 attention over what the FP8 pages hold after the step's writes
    stored = {"k": dequantized(np.asarray(k_pages), k_scale),
              "v": dequantized(np.asarray(v_pages), v_scale)}
    written = {n: np.asarray(quantize(jnp.asarray(new[n]), jnp.asarray(s[layer]))
                             ).astype(np.float32) * s[layer][None, :, None]
               for n, s in (("k", k_scale), ("v", v_scale))}
    want, _, _ = write_and_attend(**dict(
        step, k=jnp.asarray(written["k"]), v=jnp.asarray(written["v"]),
        k_pages=jnp.asarray(stored["k"]), v_pages=jnp.asarray(stored["v"])),
        backend="reference")
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want)[valid], rtol=2e-4,
                               atol=2e-4 * np.abs(np.asarray(want)).max())
    assert np.all(np.asarray(out)[~valid] == 0)
    # nothing but the step's slots changed
    untouched = np.ones(pages["k_pages"].shape[1:3], bool)
    slot_pages, slot_offsets, real = token_slots(inputs)
    untouched[slot_pages[real], slot_offsets[real]] = False
    for n in ("k", "v"):  # the step's tokens hold their quantized values
        np.testing.assert_array_equal(stored[n][layer][slot_pages[real], slot_offsets[real]],
                                      written[n][real])
    for name, got in (("k_pages", k_pages), ("v_pages", v_pages)):
        got = np.asarray(got).astype(np.float32)
        before = pages[name].astype(np.float32)
        np.testing.assert_array_equal(got[layer][untouched], before[layer][untouched])
        assert np.all(np.isfinite(got))


def test_values_past_the_range_saturate():
    scale = jnp.asarray([1.0, 0.001])
    x = jnp.asarray([[[1e6, -1e6], [1.0, 0.5]]], jnp.float32).reshape(1, 2, 2)
    q = np.asarray(quantize(x, scale)).astype(np.float32)
    assert np.all(np.isfinite(q))
    np.testing.assert_array_equal(q[0, 0], [FP8_MAX, -FP8_MAX])
    np.testing.assert_array_equal(q[0, 1], [FP8_MAX, FP8_MAX])  # 1000 and 500 > 448
