"""Hand-written mutation testing: realistic one-line bugs in the engine's mechanisms, each with
the fast tests that should catch it (`mutations`), run on a scratch copy (`run`; `make mutants`).
Not part of `make test`."""
