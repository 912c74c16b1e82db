"""Missing, truncated, malformed or mismatched checkpoints fail with `CheckpointError` (a
ValueError) naming the file, and the tensor or key; mutated files (hypothesis) load or raise
it, nothing else."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dendrite_jax.config import load_preset, preset_names
from dendrite_jax.model.checkpoint_error import CheckpointError
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.safetensors_reader import read_safetensors
from dendrite_jax.model.tiny_checkpoints import write_safetensors, write_tiny_gguf
from dendrite_jax.model.weights import hf_model_config
from tests.helpers import SMOLLM_FILE, smollm_dir


def test_presets_load():
    assert {"smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"} <= set(preset_names())
    one_b = load_preset("llama-3.2-1b").model
    assert 1.2e9 < one_b.num_params() < 1.3e9  # Llama-3.2-1B: 1.24B parameters
    eight_b = load_preset("llama-3.1-8b").model
    assert 8.0e9 < eight_b.num_params() < 8.1e9  # Llama-3.1-8B: 8.03B parameters
    qwen3_moe = load_preset("qwen3-30b-a3b").model
    assert 30.4e9 < qwen3_moe.num_params() < 30.6e9  # Qwen3-30B-A3B: 30.5B parameters
    mixtral = load_preset("mixtral-8x7b").model
    assert 46.6e9 < mixtral.num_params() < 46.8e9  # Mixtral-8x7B: 46.7B parameters


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
    with pytest.raises(CheckpointError, match=r"cut\.gguf: '.*': truncated: the tensor ends at"):
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


def test_safetensors_reader_checks_offsets(tmp_path):
    path = tmp_path / "w.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(path, {"a": a, "b": np.ones(5, np.float32)})
    loaded = read_safetensors(path)
    np.testing.assert_array_equal(loaded["a"], a)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: 'b': truncated: the tensor ends"):
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
    with pytest.raises(CheckpointError, match="'model_type': model type 'gpt2' is not supported"):
        load_model(str(tmp_path), "float32")


def test_preset_needing_a_missing_package(tmp_path, monkeypatch):
    preset = tmp_path / "custom.toml"
    preset.write_text('install_hint = "pip install no-such-package"\n[checkpoint]\n'
                      'format = "gguf"\npython_package = "no_such_package_xyz"\nfile = "m.gguf"\n')
    with pytest.raises(ValueError, match="needs the Python package 'no_such_package_xyz'.*pip install"):
        load_model(str(preset), "float32")


# ------------------------------------------------------------------ malformed files, one by one

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def test_gguf_bad_alignment_and_empty_file(tmp_path, tiny_gguf):
    """general.alignment 0 would divide by zero; an empty file cannot be mapped."""
    data = _with_alignment(tiny_gguf, 0)
    path = tmp_path / "align.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"align\.gguf: 'general\.alignment': must be a "
                       "positive multiple of 8, got 0"):
        GgufFile(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.gguf: empty file"):
        load_model(str(empty), "float32")


def _with_alignment(tiny_gguf: bytes, alignment: int) -> bytes:
    """The tiny GGUF with a general.alignment (uint32) entry added to its metadata."""
    import struct

    count_at = 4 + 4 + 8  # magic, version, tensor count; then the metadata count
    (count,) = struct.unpack_from("<Q", tiny_gguf, count_at)
    key = b"general.alignment"
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<I", 4) + struct.pack("<I", alignment)
    body = tiny_gguf[count_at + 8:]
    return tiny_gguf[:count_at] + struct.pack("<Q", count + 1) + entry + body


def test_gguf_zero_dimensional_tensor(tmp_path):
    import gguf

    path = tmp_path / "scalar.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("scalar", np.float32(1.0).reshape(()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"scalar\.gguf: 'scalar': tensor has 0 dimensions"):
        GgufFile(path)


def test_gguf_wrong_shape_names_file_and_tensor(tmp_path):
    import gguf

    source = write_tiny_gguf(tmp_path / "ok.gguf")
    reader = gguf.GGUFReader(str(source))
    bad = tmp_path / "shape.gguf"
    writer = gguf.GGUFWriter(str(bad), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY
                             else None)
    for t in reader.tensors:
        array = np.array(t.data)
        if t.name == "blk.1.ffn_down.weight":
            array = array[:, :-1]
        writer.add_tensor(t.name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"shape\.gguf: 'blk\.1\.ffn_down\.weight': tensor "
                       r"has shape \(16, 31\), the model's metadata needs \(16, 32\)"):
        load_model(str(bad), "float32")


def test_nonfinite_weights_are_refused(tmp_path):
    import gguf

    path = write_tiny_gguf(tmp_path / "nan.gguf")
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.1.attn_output.weight")
    start = tensor.data_offset
    np.frombuffer(data, np.float32, 1, start)[:] = np.nan
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"nan\.gguf: weights hold NaN or infinite "
                       r"values: layers\.w_o \(layer 1\)"):
        load_model(str(path), "float32")


def _hf_config(**overrides) -> dict:
    config = {"model_type": "llama", "vocab_size": 260, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "tie_word_embeddings": True}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


@pytest.mark.parametrize("config, match", [
    (_hf_config(num_attention_heads=None), r"'num_attention_heads': missing"),
    (_hf_config(hidden_size="16"), r"'hidden_size': must be a positive integer, got '16'"),
    (_hf_config(hidden_size=True), r"'hidden_size': must be a positive integer, got True"),
    (_hf_config(rms_norm_eps=float("nan")), r"'rms_norm_eps': must be a finite number"),
    (_hf_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}),
     r"'rope_scaling\.low_freq_factor': missing \(rope type 'llama3' needs it\)"),
    (_hf_config(rope_scaling=[1, 2]), r"'rope_scaling': must be an object"),
    ([1, 2, 3], r"config\.json: must hold a JSON object, not list"),
])
def test_malformed_config_json(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_model(str(tmp_path), "float32")


def test_safetensors_malformed_headers(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", {"a": np.ones((2, 3), np.float32)})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])

    def rewrite(new_header) -> Path:
        blob = json.dumps(new_header).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + header_len:])
        return path

    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_safetensors(rewrite([header]))
    with pytest.raises(CheckpointError, match=r"'a': tensor has bad data_offsets \[-8, 16\]"):
        read_safetensors(rewrite({"a": {**header["a"], "data_offsets": [-8, 16]}}))
    with pytest.raises(CheckpointError, match=r"'a': tensor has bad shape \['2', 3\]"):
        read_safetensors(rewrite({"a": {**header["a"], "shape": ["2", 3]}}))
    with pytest.raises(CheckpointError, match=r"'a': tensor entry is not an object"):
        read_safetensors(rewrite({"a": 5}))


def test_shard_index_outside_the_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(_hf_config()))
    write_safetensors(tmp_path / "outside.safetensors", {"x": np.ones(2, np.float32)})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: points outside the checkpoint "
                       r"directory"):
        load_model(str(directory), "float32")


def test_dotted_python_package_is_not_imported(tmp_path, monkeypatch):
    """A preset naming `pkg.sub` would import (run) `pkg` to look for `sub`: refused first."""
    package = tmp_path / "trap_pkg_xyz"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    preset = tmp_path / "trap.toml"
    preset.write_text('[checkpoint]\nformat = "gguf"\npython_package = "trap_pkg_xyz.sub"\n'
                      'file = "m.gguf"\n')
    with pytest.raises(ValueError, match="must be a top-level package name"):
        load_model(str(preset), "float32")


# ----------------------------------------------------------------------------- fuzzed files

def _load_or_checkpoint_error(path: Path) -> None:
    with contextlib.suppress(CheckpointError):
        load_model(str(path), "float32")


@pytest.fixture(scope="module")
def gguf_slots(tmp_path_factory):
    """(byte offset, numpy dtype) of every number in the tiny GGUF's header that sizes or
    places something: string lengths, value types, array counts, scalar values, tensor
    dimension counts, dimensions, types and data offsets."""
    import gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("slots") / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))
    base = reader.data.__array_interface__["data"][0]
    slots = []
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    for field in fields:
        for part in field.parts[:8]:  # a long array's first items are enough
            if part.dtype != np.uint8:
                offset = part.__array_interface__["data"][0] - base
                slots += [(offset + i * part.dtype.itemsize, part.dtype)
                          for i in range(min(part.size, 4))]
    return slots


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_loads_or_raises_checkpoint_error(tmp_path, tiny_gguf, gguf_slots, data):
    """A small GGUF with one header number (a count, length, dimension, type, offset or
    metadata value) set to an edge value, truncated, or with a flipped bit: the loader returns
    a model or raises CheckpointError."""
    blob = bytearray(tiny_gguf)
    kind = data.draw(st.sampled_from(["field", "field", "truncate", "flip"]))
    if kind == "field":
        offset, dtype = data.draw(st.sampled_from(gguf_slots))
        top = np.iinfo(dtype).max if dtype.kind in "iu" else 1e30
        value = data.draw(st.sampled_from([0, 1, 2, 3, 7, 13, 31, 255, 4096, 2**31 - 1, top]))
        np.frombuffer(blob, dtype, 1, offset)[:] = np.asarray(value).astype(dtype)
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(blob))
    _load_or_checkpoint_error(path)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_safetensors_reads_or_raises_checkpoint_error(tmp_path, data):
    path = write_safetensors(tmp_path / "w.safetensors", {
        "a": np.ones((3, 4), np.float32), "b": np.arange(5, dtype=np.float32)})
    blob = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "header"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header["a"][field] = data.draw(st.one_of(
            st.integers(-10, 100), st.text(max_size=4), st.lists(st.integers(-10, 100), max_size=3),
            st.none(), st.booleans()))
        raw = json.dumps(header).encode()
        blob = bytearray(len(raw).to_bytes(8, "little") + raw + blob[8 + header_len:])
    path.write_bytes(bytes(blob))
    try:
        tensors = read_safetensors(path)
    except CheckpointError:
        return
    for name, array in tensors.items():
        assert isinstance(name, str) and isinstance(array, np.ndarray)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3), max_leaves=6)


@settings(max_examples=80, deadline=None)
@given(overrides=st.dictionaries(st.sampled_from([
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
    "max_position_embeddings", "sliding_window", "model_type"]), json_values, max_size=3))
def test_fuzzed_config_json(overrides):
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory)
        (path / "config.json").write_text(json.dumps(_hf_config(**overrides)))
        try:
            cfg = hf_model_config(path)
        except CheckpointError:
            return
        assert cfg.num_heads >= 1 and cfg.hidden_size >= 1
