"""Hugging Face transformers `generate` with a static, compiled KV cache: the baseline that
the serving and GPU benchmarks divide by. CUDA only; random weights from a dendrite preset.
"""

from __future__ import annotations

from timing import best_seconds

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


def generate_seconds(model, prompts: list[list[int]], new_tokens: int, warmups: int = 2,
                     stop_after: int | None = None, repeats: int = 1) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens per prompt (the best of
    `repeats` timed calls), after `warmups` untimed calls on the same shapes (compilation,
    autotuning). Prompts must have equal lengths (no padding). With `stop_after`, generation
    stops after that many tokens while the static cache (and so the compiled graph) stays sized
    for `new_tokens`: the difference of two timings is transformers' own decode time per token,
    with no recompilation between them."""
    import torch
    import transformers

    ids = torch.tensor(prompts, device="cuda")
    prompt_len = ids.shape[1]

    class StopAfter(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # a shape test: no device sync
            done = input_ids.shape[1] - prompt_len >= stop_after
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    stopping = transformers.StoppingCriteriaList([StopAfter()] if stop_after else [])

    def run() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                           stopping_criteria=stopping)
        torch.cuda.synchronize()

    for _ in range(warmups):
        run()
    return best_seconds(run, repeats)
