"""Run the mutations (`tests.mutants.mutations`) against their tests, each on a scratch copy.

    python -m tests.mutants.run [NAME_OR_MECHANISM ...] [--timeout S] [--output PATH]

The repository's files (tracked, and untracked ones git does not ignore) are copied once into a
temporary directory. Each mutation patches one file there, runs its tests with pytest in that
copy (PYTHONPATH first, so the copy's packages shadow the editable install), then restores the
file. Caught: pytest reports failing tests (exit 1). MISSED: they pass. BROKEN: the patch does
not apply, pytest ends otherwise (collection error, no tests: exit 2-5) or runs out of time.
Exits non-zero if any mutation is missed or broken. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.mutants.mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "mutants.json"
# Fixed hypothesis seed: a mutation is caught or missed the same way on every run.
PYTEST_ARGS = ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
               "--hypothesis-seed=0")
PACKAGES = ("dendrite_jax", "kernels_pallas", "tests")


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    mechanism: str
    path: str
    tests: tuple[str, ...]
    status: str  # caught, MISSED or BROKEN
    seconds: float
    exit_code: int | None
    detail: str  # the first failure (caught) or what went wrong (BROKEN)


def copy_repository(dest: Path) -> int:
    """Copy the files git knows of (tracked, or untracked and not ignored) to `dest`."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    count = 0
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted from the work tree is skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            count += 1
    return count


def scratch_env(scratch: Path) -> dict[str, str]:
    """The environment of each test run: the copy's packages first; no bytecode written, so a
    patched file is never shadowed by a stale .pyc of the same size and mtime second."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(scratch), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def check_imports(scratch: Path, env: dict[str, str]) -> None:
    """Fail loudly unless the copy's packages are the ones a test run imports."""
    code = ("import importlib, sys\n"
            f"for name in {PACKAGES!r}:\n"
            "    print(importlib.import_module(name).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    outside = [f for f in out if not Path(f).resolve().is_relative_to(scratch.resolve())]
    if outside:
        raise SystemExit(f"the scratch copy does not shadow the installed packages: {outside}")


def first_failure(output: str) -> str:
    """The first FAILED/ERROR line of pytest's summary, else its last line ("3 passed ...")."""
    lines = [line for line in output.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return (failed[:1] or lines[-1:] or [""])[0][:200]


def run_tests(tests: tuple[str, ...], scratch: Path, env: dict[str, str],
              timeout: float) -> tuple[int | None, str]:
    """(pytest's exit code or None on timeout, its output) for `tests` in the copy."""
    shutil.rmtree(scratch / ".hypothesis", ignore_errors=True)  # no examples kept between runs
    proc = subprocess.Popen([sys.executable, *PYTEST_ARGS, *tests], cwd=scratch, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest's own session, started above
        return None, proc.communicate()[0]
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C reaches only us): end pytest's session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_mutation(m: Mutation, scratch: Path, env: dict[str, str], timeout: float) -> Result:
    """Patch, test and restore one mutation in the copy."""
    target = scratch / m.path
    start = time.monotonic()

    def result(status: str, code: int | None, detail: str) -> Result:
        return Result(m.name, m.mechanism, m.path, m.tests, status,
                      round(time.monotonic() - start, 1), code, detail)

    if not target.is_file():
        return result("BROKEN", None, f"{m.path} does not exist")
    original = target.read_bytes()
    text = original.decode()
    if text.count(m.old) != 1:
        return result("BROKEN", None, f"`old` occurs {text.count(m.old)} times in {m.path}")
    try:
        target.write_bytes(text.replace(m.old, m.new).encode())
        code, out = run_tests(m.tests, scratch, env, timeout)
    finally:
        target.write_bytes(original)
    if code is None:
        return result("BROKEN", None, f"timed out after {timeout:.0f} s")
    if code == 0:
        return result("MISSED", 0, first_failure(out))
    if code == 1:
        return result("caught", 1, first_failure(out))
    return result("BROKEN", code, f"pytest exit {code}: {first_failure(out)}")


def select(names: list[str]) -> list[Mutation]:
    """The mutations named, or of the mechanisms named; all without names."""
    if not names:
        return list(MUTATIONS)
    known = {m.name for m in MUTATIONS} | {m.mechanism for m in MUTATIONS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"unknown mutations or mechanisms: {unknown} (see --list)")
    return [m for m in MUTATIONS if m.name in names or m.mechanism in names]


def summary(results: list[Result], seconds: float) -> str:
    """A table of caught / missed / broken per mechanism, and the totals."""
    by_mechanism: dict[str, collections.Counter] = {}
    for r in results:
        by_mechanism.setdefault(r.mechanism, collections.Counter())[r.status] += 1
    rows = [f"{'mechanism':<22}{'caught':>8}{'missed':>8}{'broken':>8}"]
    for mechanism, c in [*by_mechanism.items(), ("total", collections.Counter(
            r.status for r in results))]:
        rows.append(f"{mechanism:<22}{c['caught']:>8}{c['MISSED']:>8}{c['BROKEN']:>8}")
    rows.append(f"wall time {seconds:.0f} s")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations or mechanisms to run (default: all)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds per mutation's test run (default: 240)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)
    chosen = select(args.names)
    if args.list:
        for m in chosen:
            print(f"{m.name:<40} {m.mechanism:<20} {m.path}")
        return 0
    start = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="dendrite-mutants-"))
    results = []
    try:
        copied = copy_repository(scratch)
        env = scratch_env(scratch)
        check_imports(scratch, env)
        print(f"{copied} files copied to {scratch}; {len(chosen)} mutations", flush=True)
        for m in chosen:
            r = run_mutation(m, scratch, env, args.timeout)
            results.append(r)
            print(f"{r.name:<40} {r.mechanism:<20} {r.status:<7} {r.seconds:6.1f} s  {r.detail}",
                  flush=True)
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - start
    print("\n" + summary(results, seconds))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    counts = collections.Counter(r.status for r in results)
    args.output.write_text(json.dumps({
        "total_seconds": round(seconds, 1),
        "counts": {s: counts[s] for s in ("caught", "MISSED", "BROKEN")},
        "mutations": [dataclasses.asdict(r) for r in results]}, indent=1) + "\n")
    print(f"results written to {args.output}")
    return 1 if counts["MISSED"] or counts["BROKEN"] else 0


if __name__ == "__main__":
    sys.exit(main())
