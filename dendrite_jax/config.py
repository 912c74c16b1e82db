"""Model and engine configuration: frozen dataclasses validated at construction.

`ModelConfig` describes a Llama-family transformer (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2).
`EngineConfig` describes the serving engine (pages, batch limits, dtype). Presets live in
`configs/*.toml`; `load_preset` resolves a preset name or a path to a TOML file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from dendrite_jax.validation import is_int

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling. `kind` is "llama3" (Llama 3.1+) or "linear"."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r}; supported: llama3, linear")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder. Static: hashed into compiled steps."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on the q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None  # Mistral-style local attention, in tokens
    # Mixture-of-experts MLP in every layer (Qwen3-MoE; `model.moe`): experts per layer (0: a
    # dense MLP), experts per token, each expert's hidden size, and whether the kept experts'
    # routing weights are renormalised to sum to 1.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    name: str = "model"
    # Tensor-parallel shards the fused projections are grouped by (`model.tensor_parallel`);
    # set by LLM(tensor_parallel_size=...), 1 for a checkpoint as loaded.
    shards: int = 1

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts and not (1 <= self.num_experts_per_tok <= self.num_experts
                                     and self.moe_intermediate_size > 0):
            raise ValueError(f"a mixture of {self.num_experts} experts needs "
                             f"num_experts_per_tok in [1, {self.num_experts}] and a positive "
                             f"moe_intermediate_size, got {self.num_experts_per_tok} and "
                             f"{self.moe_intermediate_size}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        d, f, layers = self.hidden_size, self.intermediate_size, self.num_layers
        mlp = (d * self.num_experts * (1 + 3 * self.moe_intermediate_size) if self.num_experts
               else 3 * d * f)
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + mlp + 2 * d
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return layers * per_layer + self.vocab_size * d + d + head

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2], float64, with scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta ** exponents)
        scaling = self.rope_scaling
        if scaling is None:
            return inv
        if scaling.kind == "linear":
            return inv / scaling.factor
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv / scaling.factor + smooth * inv
        return np.where(wavelen > low_wavelen, inv / scaling.factor,
                        np.where(wavelen < high_wavelen, inv, blended))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        values = dict(values)
        scaling = values.pop("rope_scaling", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values, rope_scaling=RopeScaling(**scaling) if scaling else None)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Where a preset's weights come from: a GGUF file in an installed package, or random."""

    format: str  # "gguf" or "random"
    python_package: str | None = None
    file: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in ("gguf", "random"):
            raise ValueError(f"checkpoint format must be 'gguf' or 'random', got {self.format!r}")
        if self.format == "gguf" and not (self.python_package and self.file):
            raise ValueError("a gguf checkpoint needs python_package and file")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    checkpoint: CheckpointSpec
    model: ModelConfig | None  # None: read from the checkpoint itself
    install_hint: str = ""


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_preset(name_or_path: str) -> Preset:
    """Resolve a preset name (`smollm2-135m`) or a path to a preset TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(
            f"unknown model {name_or_path!r}: not a preset ({', '.join(preset_names())}), "
            "a preset .toml file, a .gguf file, a Hugging Face checkpoint directory or a "
            "Hugging Face repo id (org/name)")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    checkpoint, model = data.get("checkpoint"), data.get("model")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: a model preset needs a [checkpoint] table")
    if model is not None and not isinstance(model, dict):
        raise ValueError(f"{path}: [model] must be a table")
    unknown = sorted(set(checkpoint) - {f.name for f in dataclasses.fields(CheckpointSpec)})
    if unknown:
        raise ValueError(f"{path}: unknown [checkpoint] keys {unknown}")
    try:
        return Preset(name=path.stem, checkpoint=CheckpointSpec(**checkpoint),
                      model=None if model is None else ModelConfig.from_dict(
                          {"name": path.stem, **model}),
                      install_hint=str(data.get("install_hint", "")))
    except (TypeError, ValueError) as e:  # wrong value types reach the dataclasses as TypeError
        raise ValueError(f"{path}: {e}") from None


ENGINE_CONFIG_DIR = CONFIG_DIR / "engine"


def engine_preset_names() -> list[str]:
    return sorted(p.stem for p in ENGINE_CONFIG_DIR.glob("*.toml"))


def load_engine_preset(name_or_path: str, allowed: set[str]) -> dict:
    """The [engine] table of an engine preset (`configs/engine/<name>.toml` or a path): LLM
    keyword arguments, each checked against `allowed`."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = ENGINE_CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"unknown engine preset {name_or_path!r}: not one of "
                         f"{', '.join(engine_preset_names())} nor a .toml file")
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f).get("engine")
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: an engine preset needs an [engine] table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown engine settings {unknown}; LLM takes {sorted(allowed)}")
    return table


def _setting(default: Any, help: str, choices: tuple | None = None) -> Any:
    """An EngineConfig field with the help text (and choices) its command-line flag shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every engine setting, each with one default: `LLM(**settings)`, the engine presets
    (configs/engine/*.toml) and both command lines take these names. Settings left None or
    "auto" are decided for the platform in one place, `engine.settings.resolve`; the engine
    only ever sees resolved ones (`LLM.stats().config`)."""

    dtype: str = _setting("float32", "Compute dtype.", DTYPES)
    page_size: int = _setting(16, "Tokens per KV page (a power of two >= 8).")
    num_pages: int | None = _setting(None, "KV pages; default: enough for max_num_seqs full "
                                     "contexts, capped by kv_cache_bytes.")
    max_num_seqs: int = _setting(8, "Requests decoded together (the decode batch).")
    max_num_batched_tokens: int = _setting(512, "Tokens per step (prefill chunking).")
    max_model_len: int | None = _setting(None, "Context limit; default the model's.")
    kv_cache_bytes: int = _setting(1 << 30, "KV-cache budget in bytes.")
    seed: int = _setting(0, "Seed of requests that give none.")
    enable_prefix_caching: bool = _setting(False, "Share KV pages of common prompt prefixes.")
    kv_compression: str = _setting("none", "KV cache format: none (the compute dtype), fp8 "
                                   "(E4M3, per-(layer, head) scales), or as codes: "
                                   "turboquant-<b>, turboquant-mse-<b>, polarquant-<b>, "
                                   "qjl-<dim> (kernels_pallas.codecs.kv).")
    kv_full_precision_window: int | None = _setting(
        None, "With a compressed KV cache: each sequence's first token and last N tokens are "
        "also kept at the compute dtype and attended from there (0: none; default: 32 with "
        "fp8 where the attention backend has it and prefix caching is off, else 0).")
    attention_backend: str = _setting("auto", "Paged attention: auto (the platform's kernel "
                                      "where it reads the cache), reference, pallas_gpu, "
                                      "pallas_tpu.",
                                      ("auto", "reference", "pallas_gpu", "pallas_tpu"))
    layer_loop: str = _setting("auto", "Layers as a lax.scan or unrolled; auto: scan on CPUs, "
                               "unrolled elsewhere.", ("auto", "scan", "unrolled"))
    warmup: bool | None = _setting(None, "Compile every step program up front, then refuse "
                                   "new ones; default: on accelerators.")
    compilation_cache: bool = _setting(True, "JAX's persistent compilation cache "
                                       "(~/.cache/dendrite_jax).")
    weights_dtype: str | None = _setting(None, "Layers' projections as FP8 (fp8 = mxfp8, or "
                                         "fp8-channel); default: dtype.",
                                         ("fp8", "mxfp8", "fp8-channel"))
    fp8_matmul: str = _setting("auto", "FP8 matmul: auto (the platform's Pallas kernel for "
                               "decode-sized matmuls), reference, pallas_gpu, pallas_tpu.",
                               ("auto", "reference", "pallas_gpu", "pallas_tpu"))
    fp8_keep_layers: tuple[int, ...] = _setting((), "With weights_dtype: layers (indices, "
                                                "negative from the end) kept unquantized.")
    fp8_fold_norms: bool | None = _setting(None, "With weights_dtype: fold the RMS norms into "
                                           "q/k/v and gate/up; default: for mxfp8 only.")
    tensor_parallel_size: int = _setting(1, "Devices the model is split over (heads, MLP "
                                         "units, KV heads).")
    split_constrained_steps: bool | None = _setting(
        None, "Launch constrained decode steps in two halves (model, then sampling with the "
        "mask) so the device runs while the host fills the mask; default off.")
    threaded_launch: bool | None = _setting(
        None, "Make constrained steps' device calls from a worker thread; default: on "
        "accelerators for steps of 16 rows or more, never on a CPU.")
    triton_gemms: bool | None = _setting(
        None, "GPUs: XLA's autotuned Triton GEMM fusions for the step's matrix products; "
        "default off (cuBLAS GEMMs: step programs compile in about half the time, bfloat16 "
        "models decode as fast; float32 models decode faster with them on).")
    decode_burst: int | None = _setting(
        None, "Decode steps per launch while every request decodes freely; default 4 on "
        "accelerators, 1 on a CPU.")
    forced_tokens: bool = _setting(
        False, "Append the tokens a constraint forces without sampling them, fed several to a "
        "row in the next step.")
    device_automata: bool | None = _setting(
        None, "Step regular constraints as automata on the device; default: on accelerators "
        "on one device.")
    automaton_states: int = _setting(4096, "States in the device's automaton table "
                                     "(states x vocabulary x 2 bytes).")

    def __post_init__(self) -> None:
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes",
                     "seed", "automaton_states", "num_pages", "max_model_len", "decode_burst",
                     "kv_full_precision_window"):
            value = getattr(self, name)
            optional = name in ("num_pages", "max_model_len", "decode_burst",
                                "kv_full_precision_window")
            if not (is_int(value) or (optional and value is None)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("split_constrained_steps", "threaded_launch", "forced_tokens",
                     "device_automata", "enable_prefix_caching", "warmup", "compilation_cache",
                     "fp8_fold_norms"):
            value = getattr(self, name)
            optional = type(self).__dataclass_fields__[name].default is None
            if not (isinstance(value, bool) or (value is None and optional)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if not is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got "
                             f"{self.tensor_parallel_size!r}")
        if not (isinstance(self.fp8_keep_layers, tuple)
                and all(is_int(i) for i in self.fp8_keep_layers)):
            raise ValueError(f"fp8_keep_layers must be a list of layer indices, got "
                             f"{self.fp8_keep_layers!r}")
        for name in ("attention_backend", "layer_loop", "weights_dtype", "fp8_matmul"):
            choices = type(self).__dataclass_fields__[name].metadata["choices"]
            value = getattr(self, name)
            if value not in choices and not (name == "weights_dtype" and value is None):
                raise ValueError(f"unknown {name} {value!r}; choose from {choices}")
        for name in ("fp8_keep_layers", "fp8_fold_norms"):
            if self.weights_dtype is None and getattr(self, name) not in ((), None):
                raise ValueError(f"{name} applies to FP8 weights: set weights_dtype too")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.automaton_states < 2:
            raise ValueError(f"automaton_states must be at least 2, got {self.automaton_states}")
        if self.kv_full_precision_window is not None and self.kv_full_precision_window < 0:
            raise ValueError(f"kv_full_precision_window must be >= 0, got "
                             f"{self.kv_full_precision_window}")
        if self.decode_burst is not None and not 1 <= self.decode_burst <= 64:
            raise ValueError(f"decode_burst must be in [1, 64], got {self.decode_burst}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.page_size < 8 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 8, got {self.page_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.page_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= page_size "
                f"({self.page_size})")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


SETTINGS = frozenset(field.name for field in dataclasses.fields(EngineConfig))
