"""Missing, truncated or mismatched checkpoints fail with errors naming the file and problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dendrite_jax.config import load_preset, preset_names
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.safetensors_reader import read_safetensors
from tests.helpers import SMOLLM_FILE, smollm_dir


def test_presets_load():
    assert {"smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"} <= set(preset_names())
    one_b = load_preset("llama-3.2-1b").model
    assert 1.2e9 < one_b.num_params() < 1.3e9  # Llama-3.2-1B: 1.24B parameters
    eight_b = load_preset("llama-3.1-8b").model
    assert 8.0e9 < eight_b.num_params() < 8.1e9  # Llama-3.1-8B: 8.03B parameters


def test_gguf_metadata_and_tensors():
    gguf = GgufFile(smollm_dir() / SMOLLM_FILE)
    assert gguf.metadata["general.architecture"] == "llama"
    assert gguf.metadata["llama.block_count"] == 30
    assert len(gguf.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(gguf.tensors) == 272
    emb = gguf.tensors["token_embd.weight"]
    assert emb.shape == (49152, 576) and emb.dequantize().shape == (49152, 576)


def test_truncated_gguf_names_the_tensor(tmp_path):
    source = smollm_dir() / SMOLLM_FILE
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(20_000_000))
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated: tensor '.*' ends at byte"):
        load_model(str(cut), "float32")
    header_only = tmp_path / "header.gguf"
    with open(source, "rb") as f:
        header_only.write_bytes(f.read(100_000))
    with pytest.raises(ValueError, match=r"header\.gguf: truncated GGUF header"):
        load_model(str(header_only), "float32")


def test_not_a_gguf_and_missing_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a model" * 10)
    with pytest.raises(ValueError, match="junk.gguf: not a GGUF file"):
        load_model(str(junk), "float32")
    with pytest.raises(ValueError, match="missing.gguf: no such GGUF file"):
        load_model(str(tmp_path / "missing.gguf"), "float32")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=r"config\.json: file not found"):
        load_model(str(empty_dir), "float32")


def _write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def test_safetensors_reader_checks_offsets(tmp_path):
    path = tmp_path / "w.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    _write_safetensors(path, {"a": a, "b": np.ones(5, np.float32)})
    loaded = read_safetensors(path)
    np.testing.assert_array_equal(loaded["a"], a)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"w\.safetensors: truncated: tensor 'b' ends at byte"):
        read_safetensors(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="no header"):
        read_safetensors(path)


def test_hf_dir_without_weights_or_with_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path), "float32")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_model(str(tmp_path), "float32")


def test_preset_needing_a_missing_package(tmp_path, monkeypatch):
    preset = tmp_path / "custom.toml"
    preset.write_text('install_hint = "pip install no-such-package"\n[checkpoint]\n'
                      'format = "gguf"\npython_package = "no_such_package_xyz"\nfile = "m.gguf"\n')
    with pytest.raises(ValueError, match="needs the Python package 'no_such_package_xyz'.*pip install"):
        load_model(str(preset), "float32")
