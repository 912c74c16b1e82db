"""Tiny random Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE models saved by
transformers load through our Hugging Face path and reproduce transformers' logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.model.checkpoint_error import CheckpointError
from dendrite_jax.model.loader import load_model
from tests.helpers import paged_logits

VOCAB = 49152  # the SmolLM2 tokenizer is saved with each model
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral-sliding-window": (transformers.MistralConfig, dict(
        rope_theta=10000.0, sliding_window=7, tie_word_embeddings=False)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(
        rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(
        rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)),
    "mixtral-sliding-window": (transformers.MixtralConfig, dict(
        rope_theta=1000000.0, sliding_window=7, tie_word_embeddings=False, num_local_experts=6,
        num_experts_per_tok=2)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(
        rope_theta=1000000.0, head_dim=32, tie_word_embeddings=False, num_experts=6,
        num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, smollm):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    smollm.tokenizer.backend.save(str(path))
    return path


def build(name, directory, tokenizer_json, shard=False):
    config_cls, extra = FAMILIES[name]
    config = config_cls(**COMMON, **extra, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed weight shows up
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            if pname.endswith(("mlp.gate.weight", "moe.gate.weight")):  # decisive routing
                p.mul_(30.0)
    model.save_pretrained(directory, max_shard_size="300KB" if shard else "5GB")
    (directory / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, tmp_path, tokenizer_json):
    hf_model = build(name, tmp_path, tokenizer_json, shard=name.startswith("qwen2"))
    if name.startswith("qwen2"):
        assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded checkpoint
    loaded = load_model(str(tmp_path), "float32")
    cfg = loaded.config
    assert cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    ids = [int(i) for i in np.random.default_rng(1).integers(3, VOCAB, 45)]
    ours = paged_logits(loaded.params, cfg, ids, page_size=8)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    spread = theirs.max() - theirs.min()
    assert np.abs(ours - theirs).max() <= 1e-4 * spread, name


@pytest.mark.parametrize("name", ["qwen3-qk-norm", "qwen3-moe", "mixtral-sliding-window"])
def test_generate_through_the_engine_matches_greedy(name, tmp_path, tokenizer_json):
    """Through the engine: the 20-token prompt in chunks of at most 16 tokens, then decode."""
    hf_model = build(name, tmp_path, tokenizer_json)
    llm = LLM(model=str(tmp_path), num_pages=64, compilation_cache=False, max_num_seqs=4,
              max_num_batched_tokens=16)
    ids = [int(i) for i in np.random.default_rng(2).integers(3, VOCAB, 20)]
    out = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                      min_new_tokens=10, pad_token_id=0,
                                      attention_mask=torch.ones(1, 20, dtype=torch.long))
    assert out.token_ids == reference[0, 20:].tolist()
    assert isinstance(out.text, str)


def test_mismatched_config_names_the_weight(tmp_path, tokenizer_json):
    build("llama3-rope-scaling", tmp_path, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'model\.layers\.0\.mlp\."
                       r"gate_proj\.weight': tensor has shape \(\d+, \d+\), config\.json needs "
                       r"\(128, "):
        load_model(str(tmp_path), "float32")


def test_truncated_safetensors_names_the_file(tmp_path, tokenizer_json):
    build("mistral-sliding-window", tmp_path, tokenizer_json)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: '.*': truncated: the tensor"):
        load_model(str(tmp_path), "float32")


def test_dense_layers_among_experts_are_refused(tmp_path, tokenizer_json):
    build("qwen3-moe", tmp_path, tokenizer_json)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mlp_only_layers"] = [1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dense layers among mixture-of-experts"):
        load_model(str(tmp_path), "float32")
