"""Hugging Face repo ids (`Qwen/Qwen3-0.6B`) resolved to checkpoint directories in the local
Hugging Face cache, the one `transformers` and `hf download` fill.

The cache is found as the Hub's own libraries find it, read from the environment at each call:
`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. A missing model is
downloaded only when the caller allows it (`allow_download`), and never while `HF_HUB_OFFLINE`
is set. Only the files a checkpoint directory is loaded from are fetched (`CHECKPOINT_FILES`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_REVISION = "main"
# config.json, tokenizer*.json, generation_config.json, the safetensors index, chat_template.jinja
# and the weights; pickled .bin weights and other formats' files stay on the Hub.
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja")
TOKENIZER_FILES = ("*.json", "*.jinja")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_TRUE = ("1", "ON", "YES", "TRUE")


def is_repo_id(name: str) -> bool:
    """Whether `name` is spelt as a Hub repo id, `org/name`; file names ending in .gguf or .toml
    are paths, never repo ids. Whether a local path of that name exists is the caller's
    question (a local path wins)."""
    if not _REPO_ID.fullmatch(name) or len(name) > 96 or Path(name).suffix in (".gguf", ".toml"):
        return False
    return ".." not in name and "--" not in name and not name.endswith((".", "-"))


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory the environment names now."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` forbids reaching the Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def repo_folder(repo_id: str, cache_dir: Path | None = None) -> Path:
    """A repo's folder in the cache (`models--org--name`): its blobs, refs and snapshots."""
    return (cache_dir or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"


def resolve_repo_id(repo_id: str, revision: str | None = None, allow_download: bool = False,
                    patterns: tuple[str, ...] = CHECKPOINT_FILES) -> Path:
    """The snapshot directory of `repo_id` at `revision` (a branch, tag or commit hash; default
    "main") in the local cache; downloaded first (the files matching `patterns`) when
    `allow_download` and not `HF_HUB_OFFLINE`. A model that is not cached and may not be
    downloaded is a ValueError naming the repo id, the revision and the cache directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = revision or DEFAULT_REVISION
    cache_dir = hub_cache_dir()
    download = allow_download and not hub_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      allow_patterns=list(patterns),
                                      local_files_only=not download))
    except LocalEntryNotFoundError as e:
        if download:  # the Hub could not be reached either
            reason = e.__cause__ or e
            raise ValueError(f"model {repo_id!r} (revision {revision!r}) is not in the Hugging "
                             f"Face cache {cache_dir} and could not be downloaded: "
                             f"{type(reason).__name__}: {reason}") from None
        raise ValueError(_not_cached(repo_id, revision, cache_dir, allow_download)) from None
    except OSError as e:  # the Hub's answers (no such repo or revision, gated) and I/O errors
        raise ValueError(f"model {repo_id!r} (revision {revision!r}): {e}") from None


def _not_cached(repo_id: str, revision: str, cache_dir: Path, allow_download: bool) -> str:
    where = f"{repo_folder(repo_id, cache_dir)} (no snapshot for revision {revision!r})"
    fetch = f"hf download {repo_id}"
    if revision != DEFAULT_REVISION:
        fetch += f" --revision {revision}"
    if allow_download:
        how = "HF_HUB_OFFLINE is set, which forbids downloading: unset it to download the model"
    else:
        how = ("downloading is off: pass allow_download=True (command line: --allow_download) "
               f"to download it, or fetch it with `{fetch}`")
    return (f"model {repo_id!r} (revision {revision!r}) is not a local path, a preset or a "
            f"model in the Hugging Face cache: looked in {where}; the cache is $HF_HUB_CACHE, "
            f"else $HF_HOME/hub; {how}")
