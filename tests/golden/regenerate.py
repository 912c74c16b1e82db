"""Rewrite the golden files from the current code: `python -m tests.golden.regenerate [case ...]`.

Run it only when a change of outputs is intended, and review the JSON diff before committing.
"""

from __future__ import annotations

import sys

from dendrite_jax import LLM
from tests.golden.cases import CASES, dumps, golden_path, run_case
from tests.helpers import SMOLLM


def main(names: list[str]) -> None:
    llm = LLM(**SMOLLM)  # the `smollm` fixture's engine
    for name in names or sorted(CASES):
        golden_path(name).write_text(dumps(run_case(llm, name)))
        print(f"wrote {golden_path(name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
