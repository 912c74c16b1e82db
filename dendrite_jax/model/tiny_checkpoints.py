"""Tiny, valid checkpoint files for the loaders' fuzz tests and `benchmarks/robustness.py` to
mutate: a Llama GGUF with a byte-level BPE tokenizer, and safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dendrite_jax.config import ModelConfig
from dendrite_jax.model.weights import checkpoint_shapes

TINY = ModelConfig(name="tiny", vocab_size=260, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                   max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=True)


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-character table: the 256 one-byte tokens of a byte-level BPE."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF (F32 weights, TINY's shapes) with a byte-level tokenizer and a
    ChatML template."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    cfg = TINY
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    tokens = [*_byte_tokens(), "<|im_start|>", "<|im_end|>", "<|endoftext|>", "Ġt"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t"])
    writer.add_token_types([1] * 256 + [3, 3, 3, 1])
    writer.add_eos_token_id(257)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                             "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    shapes = checkpoint_shapes(cfg)
    names = {"embed": "token_embd.weight", "final_norm": "output_norm.weight"}
    for key, name in names.items():
        writer.add_tensor(name, rng.standard_normal(shapes[key]).astype(np.float32))
    layer_names = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
                   "o": "attn_output", "mlp_norm": "ffn_norm", "gate": "ffn_gate",
                   "up": "ffn_up", "down": "ffn_down"}
    for i in range(cfg.num_layers):
        for key, name in layer_names.items():
            writer.add_tensor(f"blk.{i}.{name}.weight",
                              rng.standard_normal(shapes[key]).astype(np.float32) * 0.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file of float32 tensors."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
    return path
