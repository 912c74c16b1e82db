"""Hugging Face transformers `generate` with a static, compiled KV cache: the baseline that
the serving and GPU benchmarks divide by. CUDA only; random weights from a dendrite preset.
"""

from __future__ import annotations

import time

from dendrite_jax.config import load_preset


def hf_llama(preset: str, max_positions: int):
    """A bf16 Llama-shaped transformers model on CUDA with the preset's shapes."""
    import torch
    import transformers

    cfg = load_preset(preset).model
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=max_positions,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=torch.bfloat16).eval()
    # With a static cache, generate compiles the decode forward pass itself.
    model.generation_config.cache_implementation = "static"
    return model


def generate_seconds(model, prompts: list[list[int]], new_tokens: int, warmups: int = 2) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens per prompt, after
    `warmups` untimed calls on the same shapes (compilation, autotuning). Prompts must
    have equal lengths (no padding)."""
    import torch

    ids = torch.tensor(prompts, device="cuda")

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        torch.cuda.synchronize()

    for _ in range(warmups):
        run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start

