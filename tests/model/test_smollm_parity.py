"""SmolLM2-135M-Instruct (the real GGUF) against Hugging Face transformers, both float32: greedy
continuations through the default engine, logits (scanned and unrolled layers) and prompt
logprobs through `smollm`, the other tests' engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.model.params import with_layer_loop
from tests.helpers import paged_logits

LONG_TEXT = " ".join([
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "those used to make wine.",
    "Before his work, books in Europe were copied by hand, a slow and costly process that kept "
    "written knowledge in the hands of monasteries, universities and the very rich.",
    "Within fifty years presses were running in more than two hundred cities, and millions of "
    "volumes had been printed: bibles, grammars, calendars, pamphlets and scientific treatises.",
    "Cheaper books meant that more people learned to read, and the spread of literacy changed "
    "religion, politics and science in ways that are still debated by historians today.",
    "Scholars could compare identical copies of a text, correct errors in later editions and "
    "build on each other's results instead of rediscovering them.",
] * 4)

CHAT_QUESTIONS = [
    "Write a paragraph about the history of Paris.",
    "Write a poem of eight lines about the sea.",
    "Explain in detail how a neural network learns.",
    "Describe your ideal weekend in a long paragraph.",
]
PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the mountains,",
    "Here are 5 tips for staying healthy:\n1.",
    "The year 1969 was important because",
    "Photosynthesis is the process by which",
    "import numpy as np\n\n# Compute the mean and standard deviation of a list\n",
    LONG_TEXT + "\n\nIn summary, the printing press",
]


@pytest.fixture(scope="module")
def prompts(smollm):
    chat = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
            for q in CHAT_QUESTIONS]
    return PLAIN_PROMPTS + chat


def _hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def test_tokenizer_matches_transformers(smollm, hf_smollm, prompts):
    _, hf_tok = hf_smollm
    texts = prompts + ["I have 12345 apples & 0.5 pears", "ünïcödé 😀 中文 テスト", "  spaces\t\ttabs\n"]
    for text in texts:
        assert smollm.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=True), text


def test_chat_template_matches_transformers(smollm, hf_smollm):
    _, hf_tok = hf_smollm
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why?"},
         {"role": "assistant", "content": "Because."}, {"role": "user", "content": "Ok."}],
    ]
    for messages in conversations:
        for add in (True, False):
            ours = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=add)
            theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=add, tokenize=False)
            assert ours == theirs


@pytest.fixture(scope="module")
def default_llm():
    """The engine as users get it: every setting at its default (on a CPU, layer_loop "auto" is
    a scan)."""
    return LLM(model="smollm2-135m", dtype="float32")


def test_last_position_logits_match(smollm, hf_smollm, prompts):
    hf_model, _ = hf_smollm
    model = smollm.model
    assert not isinstance(model.params.layers, tuple)  # scanned layers
    for text in prompts[:4] + prompts[-2:]:
        ids = smollm.tokenizer.encode(text)
        ours = paged_logits(model.params, model.config, ids)[-1]
        theirs = _hf_logits(hf_model, ids)[-1]
        spread = theirs.max() - theirs.min()
        assert np.abs(ours - theirs).max() <= 1e-3 * spread, text[:40]
        assert ours.argmax() == theirs.argmax()


def test_unrolled_layers_logits_match(smollm, hf_smollm, prompts):
    """The unrolled layer loop (the default on accelerators) gives transformers' logits too."""
    hf_model, _ = hf_smollm
    model = smollm.model
    params = with_layer_loop(model.params, "unrolled")
    assert isinstance(params.layers, tuple)
    for text in (prompts[0], prompts[-1]):
        ids = smollm.tokenizer.encode(text)
        ours = paged_logits(params, model.config, ids)[-1]
        theirs = _hf_logits(hf_model, ids)[-1]
        assert np.abs(ours - theirs).max() <= 1e-3 * (theirs.max() - theirs.min()), text[:40]


def test_greedy_continuations_match(default_llm, hf_smollm, prompts):
    """Greedy tokens identical to transformers on 12 prompts (plain and chat, one over 500
    tokens), at least 10 of them 32+ tokens long, run as one batch through the default
    engine."""
    hf_model, _ = hf_smollm
    llm = default_llm
    encoded = [llm.tokenizer.encode(p) for p in prompts]
    assert len(encoded) >= 12 and max(len(e) for e in encoded) > 500
    outputs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    long_enough = 0
    for ids, out in zip(encoded, outputs, strict=True):
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        reference = generated[0, len(ids):].tolist()
        assert out.token_ids == reference, llm.tokenizer.decode(ids)[-60:]
        long_enough += len(reference) >= 32
    assert long_enough >= 10  # a few may end early with <|im_end|>; all must match


def test_prompt_logprobs_match(smollm, hf_smollm):
    hf_model, _ = hf_smollm
    text = PLAIN_PROMPTS[2] + " there lived an old clockmaker who never slept."
    ids = smollm.tokenizer.encode(text)
    out = smollm.generate([text], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3))[0]
    log_probs = torch.log_softmax(torch.tensor(_hf_logits(hf_model, ids)), dim=-1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for position in range(1, len(ids)):
        entry = out.prompt_logprobs[position]
        target = ids[position]
        assert target in entry
        np.testing.assert_allclose(entry[target].logprob, log_probs[position - 1, target], atol=1e-4)
        expected_rank = int((log_probs[position - 1] > log_probs[position - 1, target]).sum()) + 1
        assert entry[target].rank == expected_rank
        top3 = np.argsort(-log_probs[position - 1])[:3]
        assert set(top3) <= set(entry)
