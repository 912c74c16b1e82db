"""Checkpoints -> (ModelConfig, Params): GGUF files, Hugging Face directories, random weights.

Weights are converted on the host into the stacked, fused, `[in, out]` layout of `Params`
and cast to the compute dtype. No pickle, no network: only local files are read, and only
inside the checkpoint's directory. Every malformed input raises `CheckpointError` naming the
file and the tensor or key; each tensor's shape is checked against the config as it is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dendrite_jax.config import ModelConfig, RopeScaling
from dendrite_jax.model.checkpoint_error import (
    CheckpointError,
    finite_float,
    json_object,
    positive_int,
)
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.params import LayerParams, Params, check_shapes, random_params
from dendrite_jax.model.safetensors_reader import read_safetensors
from dendrite_jax.progress import Progress

GetTensor = Callable[[str, tuple[int, ...]], np.ndarray]  # (name, expected shape) -> array


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Each checkpoint tensor's shape, [out, in] for matrices, by its key in the name tables."""
    d, q, kv, hd = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    inter, vocab, moe = cfg.intermediate_size, cfg.vocab_size, cfg.moe_intermediate_size
    return {"embed": (vocab, d), "lm_head": (vocab, d), "final_norm": (d,), "attn_norm": (d,),
            "mlp_norm": (d,), "q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q),
            "gate": (inter, d), "up": (inter, d), "down": (d, inter), "q_bias": (q,),
            "k_bias": (kv,), "v_bias": (kv,), "q_norm": (hd,), "k_norm": (hd,),
            "router": (cfg.num_experts, d), "expert_gate": (moe, d), "expert_up": (moe, d),
            "expert_down": (d, moe)}


def _assemble(cfg: ModelConfig, get: GetTensor, names: dict[str, str], dtype: str,
              source: str) -> Params:
    """Build Params from per-layer tensors in [out, in] layout, named by `names` templates."""
    n = cfg.num_layers
    shapes = checkpoint_shapes(cfg)
    fields: dict[str, list[np.ndarray]] = {k: [] for k in (
        "attn_norm", "w_qkv", "w_o", "mlp_norm", "w_gate_up", "w_down", "b_qkv", "q_norm",
        "k_norm", "router")}
    progress = Progress(f"loading {source}", n)
    for i in range(n):
        t = lambda key, i=i: np.asarray(  # noqa: E731
            get(names[key].format(i=i), shapes[key]), np.float32)
        fields["attn_norm"].append(t("attn_norm"))
        fields["w_qkv"].append(np.concatenate([t("q"), t("k"), t("v")], axis=0).T)
        fields["w_o"].append(t("o").T)
        fields["mlp_norm"].append(t("mlp_norm"))
        if cfg.num_experts:  # experts stacked [E, ...] (`model.moe`)
            expert = lambda key, e, i=i: np.asarray(  # noqa: E731
                get(names[key].format(i=i, e=e), shapes[key]), np.float32)
            experts = range(cfg.num_experts)
            fields["router"].append(t("router").T)
            fields["w_gate_up"].append(np.stack([np.concatenate(
                [expert("expert_gate", e), expert("expert_up", e)], axis=0).T for e in experts]))
            fields["w_down"].append(np.stack([expert("expert_down", e).T for e in experts]))
        else:
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
        np.asarray(get(names["lm_head"], shapes["lm_head"]), np.float32).T)
    params = Params(embed=to_device(np.asarray(get(names["embed"], shapes["embed"]), np.float32)),
                    layers=layers,
                    final_norm=to_device(np.asarray(get(names["final_norm"], shapes["final_norm"]))),
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
        raise CheckpointError(path, f"GGUF architecture {arch!r} is not supported (only "
                              "'llama'); use a Hugging Face directory for other families",
                              "general.architecture")

    def integer(key: str, default: Any = None) -> int:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(path, "GGUF metadata lacks this key", f"llama.{key}")
        return positive_int(value, path, f"llama.{key}")

    def number(key: str, default: Any = None) -> float:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise CheckpointError(path, "GGUF metadata lacks this key", f"llama.{key}")
        return finite_float(value, path, f"llama.{key}", positive=True)

    num_heads, hidden = integer("attention.head_count"), integer("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise CheckpointError(path, "GGUF metadata gives no vocabulary size (llama.vocab_size "
                              "or tokenizer.ggml.tokens)", "llama.vocab_size")
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(path, "GGUF rope scaling is not supported", "llama.rope.scaling.type")
    try:
        return ModelConfig(
            name=path.stem, vocab_size=positive_int(vocab, path, "llama.vocab_size"),
            hidden_size=hidden, intermediate_size=integer("feed_forward_length"),
            num_layers=integer("block_count"), num_heads=num_heads,
            num_kv_heads=integer("attention.head_count_kv", num_heads),
            head_dim=integer("rope.dimension_count", hidden // num_heads or None),
            max_position_embeddings=integer("context_length"),
            rope_theta=number("rope.freq_base", 10000.0),
            rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
            tie_word_embeddings="output.weight" not in gguf.tensors)
    except CheckpointError:
        raise
    except ValueError as e:  # the config's own consistency checks
        raise CheckpointError(path, f"inconsistent model metadata: {e}") from None


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row permutation of a Q/K projection [out, in]."""
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(path: Path, dtype: str) -> tuple[ModelConfig, Params, GgufFile]:
    """Dequantize a Llama GGUF (F32/F16/Q8_0/Q4_x/K-quants) to `dtype`; also return the file."""
    gguf = GgufFile(path)
    cfg = gguf_model_config(gguf)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        tensor = gguf.tensors.get(name)
        if tensor is None:
            raise CheckpointError(path, "tensor is missing", name)
        if tensor.shape != shape:
            raise CheckpointError(path, f"tensor has shape {tensor.shape}, the model's "
                                  f"metadata needs {shape}", name)
        try:
            w = tensor.dequantize()
        except Exception as e:  # gguf's dequantizers raise assorted types on bad data
            raise CheckpointError(path, f"cannot dequantize the tensor: {e}", name) from None
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
# The router and experts' tensors of the mixture-of-experts families (Mixtral names its
# experts' gate, down and up projections w1, w2, w3).
_HF_EXPERT_NAMES = {
    "qwen3_moe": {
        "router": "model.layers.{i}.mlp.gate.weight",
        "expert_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        "expert_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
        "expert_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    },
    "mixtral": {
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "expert_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        "expert_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
    },
}
HF_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")


def hf_model_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face checkpoint directory's config.json."""
    return _hf_config_and_family(directory)[0]


def _hf_config_and_family(directory: Path) -> tuple[ModelConfig, str]:
    path = directory / "config.json"
    raw = json_object(path)
    family = raw.get("model_type")
    if family not in HF_FAMILIES:
        raise CheckpointError(path, f"model type {family!r} is not supported; supported: "
                              f"{', '.join(HF_FAMILIES)}", "model_type")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(path, f"{raw['hidden_act']!r} is not supported", "hidden_act")
    if raw.get("mlp_bias"):
        raise CheckpointError(path, "MLP biases are not supported", "mlp_bias")

    def integer(key: str, default: Any = None) -> int:
        value = raw.get(key)
        if value is None:  # absent, or null (transformers writes `"head_dim": null`)
            value = default
        if value is None:
            raise CheckpointError(path, "missing", key)
        return positive_int(value, path, key)

    # transformers >= 5 writes rope settings as `rope_parameters`; older versions as
    # `rope_theta` + `rope_scaling`.
    rope_key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    rope = raw.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise CheckpointError(path, f"must be an object, got {rope!r}", rope_key)
    rope = dict(rope)
    theta = finite_float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)), path,
                         "rope_theta", positive=True)
    kind = rope.pop("rope_type", rope.pop("type", "default"))

    def rope_number(key: str) -> float:
        if key not in rope:
            raise CheckpointError(path, f"missing (rope type {kind!r} needs it)",
                                  f"{rope_key}.{key}")
        return finite_float(rope[key], path, f"{rope_key}.{key}", positive=True)

    scaling = None
    try:
        if kind == "llama3":
            scaling = RopeScaling(kind="llama3", **{k: rope_number(k) for k in (
                "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")})
        elif kind == "linear":
            scaling = RopeScaling(kind="linear", factor=rope_number("factor"))
        elif kind != "default":
            raise CheckpointError(path, f"rope type {kind!r} is not supported (default, linear, "
                                  "llama3)", f"{rope_key}.rope_type")
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(path, str(e), rope_key) from None
    sliding_window = None
    if family in ("mistral", "mixtral") and raw.get("sliding_window") is not None:
        sliding_window = integer("sliding_window")
    elif family not in ("mistral", "mixtral") and raw.get("use_sliding_window"):
        raise CheckpointError(path, f"a per-layer sliding window ({family}) is not supported",
                              "use_sliding_window")
    heads, hidden = integer("num_attention_heads"), integer("hidden_size")
    experts = {}
    if family == "mixtral":  # every expert as wide as `intermediate_size`; weights renormalised
        experts = dict(num_experts=integer("num_local_experts"),
                       num_experts_per_tok=integer("num_experts_per_tok"),
                       moe_intermediate_size=integer("intermediate_size"), norm_topk_prob=True)
    elif family == "qwen3_moe":
        if raw.get("mlp_only_layers") or raw.get("decoder_sparse_step", 1) != 1:
            raise CheckpointError(path, "dense layers among mixture-of-experts ones "
                                  "(mlp_only_layers, decoder_sparse_step) are not supported yet",
                                  "mlp_only_layers")
        # Hub checkpoints name the count `num_experts`; transformers >= 5 writes it as
        # `num_local_experts`.
        count = "num_local_experts" if "num_experts" not in raw else "num_experts"
        experts = dict(num_experts=integer(count),
                       num_experts_per_tok=integer("num_experts_per_tok"),
                       moe_intermediate_size=integer("moe_intermediate_size"),
                       norm_topk_prob=bool(raw.get("norm_topk_prob", False)))
    try:
        return ModelConfig(
            name=directory.name, vocab_size=integer("vocab_size"), hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_layers=integer("num_hidden_layers"), num_heads=heads,
            num_kv_heads=integer("num_key_value_heads", heads),
            head_dim=integer("head_dim", hidden // heads or None),
            max_position_embeddings=integer("max_position_embeddings", 4096),
            rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=finite_float(raw.get("rms_norm_eps", 1e-6), path, "rms_norm_eps",
                                      positive=True),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"), sliding_window=sliding_window,
            **experts), family
    except ValueError as e:  # the config's own consistency checks
        raise CheckpointError(path, f"inconsistent model config: {e}") from None


def _inside(within: Path, file: Path, source: Path) -> Path:
    """`file` if it resolves inside `within` (symbolic links followed), else CheckpointError
    naming `source`, the file that pointed at it."""
    resolved = file.resolve()
    if not resolved.is_relative_to(within.resolve()):
        raise CheckpointError(source, f"points outside the checkpoint directory: {file}")
    return file


def _hf_weight_files(directory: Path, within: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(index, "must map tensor names to file names", "weight_map")
        files = sorted({_inside(within, directory / f, index) for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f, f"listed in {index.name} but missing")
        return files
    files = sorted(_inside(within, f, f) for f in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(directory, "no *.safetensors weights (pickled .bin checkpoints "
                              "are not loaded, by design)")
    return files


def load_hf(directory: Path, dtype: str, within: Path | None = None
            ) -> tuple[ModelConfig, Params]:
    """Load a Llama/Mistral/Mixtral/Qwen2/Qwen3/Qwen3-MoE checkpoint directory (config.json +
    safetensors).
    Weight files must resolve inside `within` (default: the directory itself; a Hugging Face
    cache snapshot's files link to blobs in its repo's folder)."""
    cfg, family = _hf_config_and_family(directory)
    tensors: dict[str, tuple[np.ndarray, Path]] = {}
    for f in _hf_weight_files(directory, within or directory):
        for name, array in read_safetensors(f).items():
            if name in tensors:
                raise CheckpointError(f, f"tensor also in {tensors[name][1].name}", name)
            tensors[name] = (array, f)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
        raise CheckpointError(directory, "lm_head.weight is missing and embeddings are not tied")

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(directory, "tensor is missing from the safetensors files", name)
        array, file = tensors[name]
        if array.shape != shape:
            raise CheckpointError(file, f"tensor has shape {array.shape}, config.json needs "
                                  f"{shape}", name)
        return array

    names = {**_HF_NAMES, **_HF_EXPERT_NAMES.get(family, {})}
    return cfg, _assemble(cfg, get, names, dtype, directory.name)


def load_random(cfg: ModelConfig, dtype: str, seed: int) -> Params:
    return random_params(jax.random.PRNGKey(seed), cfg, dtype)
