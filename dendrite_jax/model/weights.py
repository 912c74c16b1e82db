"""Checkpoints -> (ModelConfig, Params): GGUF files, Hugging Face directories, random weights.

Weights are converted on the host into the stacked, fused, `[in, out]` layout of `Params`
and cast to the compute dtype. No pickle, no network: only local files are read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.config import ModelConfig, RopeScaling
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.params import LayerParams, Params, check_shapes, random_params
from dendrite_jax.model.safetensors_reader import read_safetensors
from dendrite_jax.progress import Progress

GetTensor = Callable[[str], np.ndarray]


def _assemble(cfg: ModelConfig, get: GetTensor, names: dict[str, str], dtype: str,
              source: str) -> Params:
    """Build Params from per-layer tensors in [out, in] layout, named by `names` templates."""
    n = cfg.num_layers
    fields: dict[str, list[np.ndarray]] = {k: [] for k in (
        "attn_norm", "w_qkv", "w_o", "mlp_norm", "w_gate_up", "w_down", "b_qkv", "q_norm",
        "k_norm")}
    progress = Progress(f"loading {source}", n)
    for i in range(n):
        t = lambda key, i=i: np.asarray(get(names[key].format(i=i)), np.float32)  # noqa: E731
        fields["attn_norm"].append(t("attn_norm"))
        fields["w_qkv"].append(np.concatenate([t("q"), t("k"), t("v")], axis=0).T)
        fields["w_o"].append(t("o").T)
        fields["mlp_norm"].append(t("mlp_norm"))
        fields["w_gate_up"].append(np.concatenate([t("gate"), t("up")], axis=0).T)
        fields["w_down"].append(t("down").T)
        if cfg.attention_bias:
            fields["b_qkv"].append(np.concatenate([t("q_bias"), t("k_bias"), t("v_bias")]))
        if cfg.qk_norm:
            fields["q_norm"].append(t("q_norm"))
            fields["k_norm"].append(t("k_norm"))
        progress.update(i + 1)
    progress.close()
    to_device = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    layers = LayerParams(**{k: to_device(np.stack(v)) if v else None for k, v in fields.items()})
    lm_head = None if cfg.tie_word_embeddings else to_device(
        np.asarray(get(names["lm_head"]), np.float32).T)
    params = Params(embed=to_device(np.asarray(get(names["embed"]), np.float32)),
                    layers=layers, final_norm=to_device(np.asarray(get(names["final_norm"]))),
                    lm_head=lm_head)
    check_shapes(params, cfg, source)
    return params


# ---------------------------------------------------------------------------------------- GGUF

_GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight", "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
}


def gguf_model_config(gguf: GgufFile) -> ModelConfig:
    meta, path = gguf.metadata, gguf.path
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama'); "
                         "use a Hugging Face directory for other families")

    def need(key: str) -> Any:
        value = meta.get(f"llama.{key}")
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    num_heads = need("attention.head_count")
    hidden = need("embedding_length")
    vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: GGUF rope scaling is not supported")
    return ModelConfig(
        name=path.stem, vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
        num_heads=int(num_heads),
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("llama.rope.dimension_count", hidden // num_heads)),
        max_position_embeddings=int(need("context_length")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in gguf.tensors)


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row permutation of a Q/K projection [out, in]."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(path: Path, dtype: str) -> tuple[ModelConfig, Params, GgufFile]:
    """Dequantize a Llama GGUF (F32/F16/Q8_0/Q4_x/K-quants) to `dtype`; also return the file."""
    gguf = GgufFile(path)
    cfg = gguf_model_config(gguf)

    def get(name: str) -> np.ndarray:
        tensor = gguf.tensors.get(name)
        if tensor is None:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        try:
            w = tensor.dequantize()
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize {name!r}: {e}") from None
        if name.endswith("attn_q.weight"):
            w = _unpermute_rotary(w, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute_rotary(w, cfg.num_kv_heads)
        return w

    return cfg, _assemble(cfg, get, _GGUF_NAMES, dtype, path.name), gguf


# ------------------------------------------------------------------------ Hugging Face directory

_HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def hf_model_config(directory: Path) -> ModelConfig:
    raw = _read_json(directory / "config.json")
    family = raw.get("model_type")
    if family not in HF_FAMILIES:
        raise ValueError(f"{directory / 'config.json'}: model_type {family!r} is not supported; "
                         f"supported: {', '.join(HF_FAMILIES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{directory}: hidden_act {raw['hidden_act']!r} is not supported")
    if raw.get("mlp_bias"):
        raise ValueError(f"{directory}: mlp_bias is not supported")
    # transformers >= 5 writes rope settings as `rope_parameters`; older versions as
    # `rope_theta` + `rope_scaling`.
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(kind="llama3", **{k: rope[k] for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
    elif kind == "linear":
        scaling = RopeScaling(kind="linear", factor=rope["factor"])
    elif kind != "default":
        raise ValueError(f"{directory}: rope type {kind!r} is not supported (default, linear, llama3)")
    sliding_window = None
    if family == "mistral":
        sliding_window = raw.get("sliding_window")
    elif raw.get("use_sliding_window"):
        raise ValueError(f"{directory}: per-layer sliding window ({family}) is not supported")
    heads = raw["num_attention_heads"]
    return ModelConfig(
        name=directory.name, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"],
        num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
        qk_norm=family == "qwen3", sliding_window=sliding_window)


def _hf_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f}: listed in {index.name} but missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors weights (pickled .bin checkpoints are "
                         "not loaded, by design)")
    return files


def load_hf(directory: Path, dtype: str) -> tuple[ModelConfig, Params]:
    """Load a Llama/Mistral/Qwen2/Qwen3 checkpoint directory (config.json + safetensors)."""
    cfg = hf_model_config(directory)
    tensors: dict[str, np.ndarray] = {}
    for f in _hf_weight_files(directory):
        tensors.update(read_safetensors(f))
    if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise ValueError(f"{directory}: lm_head.weight is missing and embeddings are not tied")

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{directory}: tensor {name!r} is missing from the safetensors files")
        return tensors[name]

    return cfg, _assemble(cfg, get, _HF_NAMES, dtype, directory.name)


def load_random(cfg: ModelConfig, dtype: str, seed: int) -> Params:
    return random_params(jax.random.PRNGKey(seed), cfg, dtype)
