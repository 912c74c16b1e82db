"""A constrained request's handle into structured output (`engine.structured`)."""

from __future__ import annotations

from dendrite_jax.grammar.automaton import BROKEN, AutomatonCursor
from dendrite_jax.grammar.matcher import forced_token

COMPLETE = "complete"  # what `ConstraintState.advance` returns when the constraint is done


class ConstraintState:
    """One request's constraint: an llguidance matcher on the host (which fills the request's
    mask before each sample and consumes the token after), or its cursor in a device automaton
    (which the step masks and advances itself); and the positions whose launched samples are
    dropped when read back, because a token the constraint forced (`Request.fast_forward`)
    filled them first. Exactly one of `matcher` and `automaton` is set."""

    def __init__(self, matcher=None, automaton: AutomatonCursor | None = None) -> None:
        if (matcher is None) == (automaton is None):
            raise ValueError("a constraint runs as a host matcher or a device automaton")
        self.matcher = matcher
        self.automaton = automaton
        self.forced_positions: set[int] = set()

    @property
    def on_host(self) -> bool:
        """Whether the host masks and advances it (each token's mask needs the one before)."""
        return self.matcher is not None

    def advance(self, token: int, accepted: bool | None = None) -> str | None:
        """Take a sampled (non-stop) token: None to go on, COMPLETE where nothing more can
        follow, else the error that ends the request. `accepted`: the matcher already consumed
        it, with this result (the engine advances a step's matchers in parallel)."""
        if self.matcher is not None:
            if not (self.matcher.consume_token(token) if accepted is None else accepted):
                return f"sampled token {token} broke the constraint: {self.matcher.get_error()}"
            return COMPLETE if self.matcher.is_stopped() else None
        verdict = self.automaton.advance(token)
        if verdict == BROKEN:
            return f"sampled token {token} broke the constraint"
        return COMPLETE if verdict else None

    def forced_token(self) -> int | None:
        """The one token a host matcher allows next, or None (several, or a device automaton,
        whose forced runs the step samples as any other)."""
        return forced_token(self.matcher) if self.matcher is not None else None
