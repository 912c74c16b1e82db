"""A request's structured-output constraint as parameters carry it: the fields that name one
(`CONSTRAINTS`), their validation (`check_constraint`), and `Constrained`, what the grammar
package reads of `SamplingParams` and `BeamSearchParams`."""

from __future__ import annotations

from typing import Protocol

from dendrite_jax.validation import ParamError, check_text

CONSTRAINTS = ("json_schema", "regex", "grammar", "choice")


class Constrained(Protocol):
    """Parameters with the constraint fields (`CONSTRAINTS`), at most one of them set."""

    @property
    def json_schema(self) -> dict | str | None: ...

    @property
    def regex(self) -> str | None: ...

    @property
    def grammar(self) -> str | None: ...

    @property
    def choice(self) -> list[str] | None: ...


def check_constraint(params) -> None:
    """Validate the structured-output fields (`CONSTRAINTS`) of sampling or beam-search
    parameters: at most one, each of its type. Normalises `choice` to a list."""
    given = [n for n in CONSTRAINTS if getattr(params, n) is not None]
    _check(len(given) <= 1, given[0] if given else "",
           f"give at most one of json_schema, regex, grammar, choice; got {', '.join(given)}")
    _check(params.json_schema is None or isinstance(params.json_schema, dict | str),
           "json_schema",
           f"json_schema must be a dict or a JSON string, got "
           f"{type(params.json_schema).__name__}")
    if isinstance(params.json_schema, str):
        check_text(params.json_schema, "json_schema")
    for name in ("regex", "grammar"):
        value = getattr(params, name)
        _check(value is None or (isinstance(value, str) and value), name,
               f"{name} must be a non-empty string, got {value!r}")
        if value is not None:
            check_text(value, name)
    if params.choice is not None:
        choice = list(params.choice) if isinstance(params.choice, list | tuple) else None
        _check(bool(choice) and all(isinstance(c, str) and c for c in choice), "choice",
               f"choice must be a non-empty list of non-empty strings, got {params.choice!r}")
        for i, c in enumerate(choice):
            check_text(c, f"choice[{i}]")
        object.__setattr__(params, "choice", choice)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)
