"""Beam search on the real SmolLM2 equals transformers' `generate(num_beams=w, do_sample=False)`
(same sequences, same scores), with beams sharing the prompt's pages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dendrite_jax import BeamSearchParams
from tests.model.test_smollm_parity import LONG_TEXT

CASES = [
    ("The history of printing begins", BeamSearchParams(beam_width=2, max_tokens=10)),
    ("def fibonacci(n):", BeamSearchParams(beam_width=4, max_tokens=12)),
    ("My favourite season is", BeamSearchParams(beam_width=3, max_tokens=10, length_penalty=0.5)),
    ("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n",
     BeamSearchParams(beam_width=3, max_tokens=24, early_stopping=True)),
    ("In 1969, astronauts", BeamSearchParams(beam_width=5, max_tokens=8, length_penalty=2.0,
                                             early_stopping="never")),
]


def hf_beams(hf_smollm, ids: list[int], params: BeamSearchParams):
    model, _ = hf_smollm
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), num_beams=params.beam_width,
                             num_return_sequences=params.beam_width, do_sample=False,
                             max_new_tokens=params.max_tokens,
                             length_penalty=params.length_penalty,
                             early_stopping=params.early_stopping,
                             return_dict_in_generate=True, output_scores=True)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    seqs = []
    for seq in out.sequences[:, len(ids):].tolist():
        while seq and seq[-1] == pad and pad not in seq[:-1]:  # padding after a short hypothesis
            seq.pop()
        seqs.append(seq)
    return seqs, out.sequences_scores.tolist(), pad


@pytest.mark.parametrize("prompt,params", CASES)
def test_equals_transformers(smollm, hf_smollm, prompt, params):
    ids = smollm.tokenizer.encode(prompt)
    ours = smollm.beam_search([ids], params)[0].sequences
    seqs, scores, pad = hf_beams(hf_smollm, ids, params)
    assert len(ours) == params.beam_width
    for mine, seq, score in zip(ours, seqs, scores, strict=True):
        # A hypothesis ending in EOS is padded with EOS by transformers: compare up to ours.
        assert mine.token_ids == seq[:len(mine.token_ids)]
        assert all(t == pad for t in seq[len(mine.token_ids):])
        assert math.isclose(mine.score, score, rel_tol=1e-4, abs_tol=1e-4)
    assert [s.score for s in ours] == sorted((s.score for s in ours), reverse=True)
    assert smollm.stats().pool.used == 0  # every page given back


def test_beams_share_prompt_pages(smollm):
    ids = smollm.tokenizer.encode(LONG_TEXT)[:300]
    params = BeamSearchParams(beam_width=4, max_tokens=20)
    out = smollm.beam_search([ids, ids[:200]], params)
    page = 16
    for o, n in zip(out, (300, 200), strict=True):
        independent = params.beam_width * math.ceil((n + params.max_tokens) / page)
        assert o.max_pages_in_use <= math.ceil(n / page) + 2 * params.beam_width
        assert o.max_pages_in_use < independent / 2
    assert smollm.stats().pool.used == 0


def test_batched_prompts_equal_one_at_a_time(smollm):
    prompts = ["The recipe calls for", "Once upon a time", "The capital of France is"]
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    together = smollm.beam_search(prompts, params)
    for prompt, out in zip(prompts, together, strict=True):
        alone = smollm.beam_search([prompt], params)[0]
        assert [s.token_ids for s in out.sequences] == [s.token_ids for s in alone.sequences]
        np.testing.assert_allclose([s.score for s in out.sequences],
                                   [s.score for s in alone.sequences], rtol=1e-5)


def test_bad_parameters():
    with pytest.raises(ValueError, match="beam_width must be an integer in"):
        BeamSearchParams(beam_width=11)
    with pytest.raises(ValueError, match="early_stopping must be"):
        BeamSearchParams(early_stopping="sometimes")
    with pytest.raises(ValueError, match="beam_width must be an integer in .*, got True"):
        BeamSearchParams(beam_width=True)
    with pytest.raises(ValueError, match="length_penalty must be a finite number, got inf"):
        BeamSearchParams(length_penalty=float("inf"))
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never', got 1"):
        BeamSearchParams(early_stopping=1)
