"""Hugging Face repo ids resolve through a local cache in the hub's layout (blobs, refs,
snapshots of links), found by HF_HUB_CACHE or HF_HOME, at a revision; nothing is downloaded,
and a missing model's error says where it looked and how to allow a download."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.model import hub
from dendrite_jax.model.gguf_file import GgufFile
from dendrite_jax.model.loader import load_model, load_tokenizer
from dendrite_jax.model.tiny_checkpoints import TINY, write_tiny_gguf
from dendrite_jax.model.tokenizer import Tokenizer

REPO = "tiny-org/tiny-llama"
MAIN = "a" * 40  # commit hashes: refs/main and a second snapshot, tagged v2
V2 = "b" * 40


def save_checkpoint(directory: Path, tokenizer: Tokenizer, seed: int) -> Path:
    """A tiny random Llama saved by transformers, with the tiny GGUF's byte-level tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden_size,
        intermediate_size=TINY.intermediate_size, num_hidden_layers=TINY.num_layers,
        num_attention_heads=TINY.num_heads, num_key_value_heads=TINY.num_kv_heads,
        max_position_embeddings=TINY.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_hf_dir(directory)
    return directory


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs=()) -> Path:
    """`source`'s files as the hub caches them: content-named blobs, a snapshot of relative
    links to them, and refs naming the commit."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    for file in source.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, folder / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(main, v2): two tiny checkpoints of the same shape and different weights."""
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer.from_gguf(GgufFile(write_tiny_gguf(root / "tiny.gguf")))
    return (save_checkpoint(root / "main", tokenizer, seed=0),
            save_checkpoint(root / "v2", tokenizer, seed=1))


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """No Hugging Face setting from the environment running the tests."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return monkeypatch


@pytest.fixture
def cache(hub_env, tmp_path, checkpoints):
    """A cache holding REPO at main and at v2, named by HF_HUB_CACHE."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, MAIN, checkpoints[0], refs=("main",))
    add_snapshot(cache, REPO, V2, checkpoints[1], refs=("v2",))
    hub_env.setenv("HF_HUB_CACHE", str(cache))
    return cache


def embed(model) -> np.ndarray:
    return np.asarray(model.params.embed)


@pytest.mark.parametrize("name, expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("Qwen/Qwen3-0.6B", True),
    ("smollm2-135m", False), ("/abs/model", False), ("a/b/c", False),
    ("org/model.gguf", False), ("configs/x.toml", False), ("org/a..b", False),
    ("org/a--b", False), ("org/model-", False), ("./org", False),
])
def test_repo_id_spelling(name, expected):
    assert hub.is_repo_id(name) is expected


def test_resolves_by_hf_hub_cache(cache, checkpoints):
    snapshot = hub.resolve_repo_id(REPO)
    assert snapshot == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / MAIN
    loaded = load_model(REPO, "float32")
    assert loaded.config.name == REPO  # not the snapshot's commit hash
    np.testing.assert_array_equal(embed(loaded), embed(load_model(str(checkpoints[0]),
                                                                  "float32")))


def test_resolves_by_hf_home(hub_env, tmp_path, checkpoints):
    home = tmp_path / "hf-home"
    add_snapshot(home / "hub", REPO, MAIN, checkpoints[0], refs=("main",))
    hub_env.setenv("HF_HOME", str(home))
    assert hub.hub_cache_dir() == home / "hub"
    assert hub.resolve_repo_id(REPO) == home / "hub" / "models--tiny-org--tiny-llama" / \
        "snapshots" / MAIN


def test_revision_picks_the_snapshot(cache, checkpoints):
    by_tag = load_model(REPO, "float32", revision="v2")
    np.testing.assert_array_equal(embed(by_tag), embed(load_model(str(checkpoints[1]),
                                                                  "float32")))
    assert hub.resolve_repo_id(REPO, revision=V2) == hub.resolve_repo_id(REPO, revision="v2")
    assert not np.array_equal(embed(by_tag), embed(load_model(REPO, "float32")))
    with pytest.raises(ValueError, match="revision 'v3'"):
        load_model(REPO, "float32", revision="v3")


def test_missing_model_says_where_it_looked(cache):
    with pytest.raises(ValueError) as error:
        load_model("other-org/missing", "float32", revision="v1")
    message = str(error.value)
    for part in ("'other-org/missing'", "revision 'v1'",
                 str(cache / "models--other-org--missing"), "allow_download=True",
                 "--allow_download", "hf download other-org/missing --revision v1"):
        assert part in message, (part, message)


def test_offline_wins_over_allow_download(cache, hub_env):
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'other-org/missing' \(revision 'main'\).*"
                       r"HF_HUB_OFFLINE is set"):
        load_model("other-org/missing", "float32", allow_download=True)
    assert hub.resolve_repo_id(REPO, allow_download=True).name == MAIN  # cached: still found


def test_download_only_when_allowed(cache, monkeypatch):
    """The Hub is asked (local_files_only False) only with allow_download; spied, not run."""
    import huggingface_hub

    asked = []

    def spy(repo_id, **kwargs):
        asked.append(kwargs["local_files_only"])
        return str(cache / "models--tiny-org--tiny-llama" / "snapshots" / MAIN)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    hub.resolve_repo_id(REPO)
    hub.resolve_repo_id(REPO, allow_download=True)
    assert asked == [True, False]


def test_local_path_wins_over_repo_id(cache, checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoints[1], tmp_path / REPO)  # ./tiny-org/tiny-llama holds v2's weights
    np.testing.assert_array_equal(embed(load_model(REPO, "float32")),
                                  embed(load_model(str(checkpoints[1]), "float32")))
    with pytest.raises(ValueError, match="revision 'v2' applies to Hugging Face repo ids"):
        load_model(REPO, "float32", revision="v2")


def test_neither_preset_path_nor_repo_id_keeps_its_error(cache):
    for name in ("no-such-model", "a/b/c"):
        with pytest.raises(ValueError, match=f"unknown model '{name}': not a preset"):
            load_model(name, "float32")


def test_tokenizer_by_repo_id(cache, checkpoints):
    tokenizer = load_tokenizer(REPO)
    assert tokenizer.encode("hello") == Tokenizer.from_hf_dir(checkpoints[0]).encode("hello")


def test_repo_id_generates_as_its_directory(cache, checkpoints):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    settings = dict(num_pages=16, compilation_cache=False)
    by_id = LLM(model=REPO, revision="v2", **settings)
    by_dir = LLM(model=str(checkpoints[1]), **settings)
    prompt = [5, 17, 42, 99, 200]
    assert by_id.generate([prompt], params)[0].token_ids == \
        by_dir.generate([prompt], params)[0].token_ids
    assert by_id.config.name == REPO
    assert os.path.islink(Path(by_id.model.source) / "model.safetensors")
