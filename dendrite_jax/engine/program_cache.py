"""ProgramCache: compiled step programs kept on disk, so a second start skips tracing too.

JAX's persistent compilation cache skips XLA's compile on a second start, but each program is
still traced and lowered first to find its cache key, and those are Python, one program at a
time under the GIL: on a small CPU host most of a warm start. This
cache stores each serialized executable (`jax.experimental.serialize_executable`) under a key
of everything that shapes it: the package's own source, JAX's version, the devices, the
arguments' tree, shapes, dtypes and shardings, and the static arguments. Loading one is a
file read. Any change of code or setting is a new key, so a stale program is never loaded;
an unreadable entry is compiled again and rewritten. A program stored here is always compiled
afresh, bypassing JAX's persistent cache: on XLA:CPU an executable that cache served and that
is serialized again loses its code ("Function ... not found" when run).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from jax._src import config as jax_config
from jax.experimental import serialize_executable

_PACKAGES = ("dendrite_jax", "kernels_pallas")


@functools.cache
def source_digest() -> str:
    """A digest of the source files of this package and its kernels."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.cache
def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _describe(leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    return f"{getattr(leaf, 'shape', None)}{getattr(leaf, 'dtype', None)}{sharding}"


class ProgramCache:
    """Serialized executables in `directory`, one file per program key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def key(self, args: tuple, statics: dict[str, Any], kind: str) -> str:
        devices = jax.devices()
        parts = [source_digest(), jax.__version__, _jaxlib_version(), devices[0].platform,
                 devices[0].device_kind, str(len(devices)), kind, str(jax.tree.structure(args)),
            ";".join(_describe(leaf) for leaf in jax.tree.leaves(args)),
            repr(sorted(statics.items()))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def load_or_compile(self, key: str, compile_fn: Callable[[], Any]) -> tuple[Any, bool]:
        """The program stored under `key`, else `compile_fn()` (stored). Returns (program,
        whether it was loaded)."""
        path = self.directory / f"{key}.program"
        if path.exists():
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                return serialize_executable.deserialize_and_load(payload, in_tree,
                                                                 out_tree), True
            except Exception:  # an unreadable entry is compiled again
                path.unlink(missing_ok=True)
        # Thread-local: warm-up's other threads keep JAX's persistent cache. JAX has no public
        # switch for it (jax.config.update is process-wide).
        with jax_config.enable_compilation_cache(False):
            compiled = compile_fn()
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception:  # a backend that cannot serialize keeps no entry
            return compiled, False
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        return compiled, False


def default_program_cache() -> ProgramCache | None:
    """A cache beside JAX's persistent compilation cache, if that one is configured, on
    accelerators. Not on a CPU: XLA:CPU executables loaded in another process failed to run
    ("Function wrapped_iota not found") in CI, also when compiled afresh."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory or jax.default_backend() == "cpu":
        return None
    return ProgramCache(Path(directory) / "dendrite_programs")
