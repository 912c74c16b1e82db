"""SamplingParams: per-request decoding settings, vLLM-shaped, validated at construction."""

from __future__ import annotations

import dataclasses

from dendrite_jax.engine.logit_bias import MAX_BIAS, MAX_LOGIT_BIAS
from dendrite_jax.engine.sampling import MAX_LOGPROBS
from dendrite_jax.grammar.constraint import CONSTRAINTS, check_constraint
from dendrite_jax.validation import ParamError, check_text, is_finite_real, is_int


@dataclasses.dataclass
class SamplingParams:
    """How to decode one request.

    temperature 0 is greedy. top_k <= 0 (or -1) disables top-k; top_p 1 and min_p 0 disable
    theirs. `seed` makes sampling reproducible and independent of the rest of the batch.
    `stop` strings end generation and are cut from the text (unless
    `include_stop_str_in_output`); `stop_token_ids` end it after emitting that token; EOS
    ends it unless `ignore_eos`. `logit_bias` ({token id: bias in [-100, 100]}, at most
    MAX_LOGIT_BIAS ids) is added to those tokens' logits before anything else (greedy
    decoding included); -100 all but bans a token. `logprobs=n` returns the top-n logprobs
    of each generated token plus the chosen one; `prompt_logprobs=n` does the same for each
    prompt token.
    Logprobs are those of the raw model distribution (before penalties and temperature); under
    a constraint, ranks and the top alternatives count only the tokens it allows.

    `n` completions per prompt share the prompt's KV pages (each samples with seed + i when a
    seed is given); with `best_of`, that many are generated and the n with the highest
    cumulative (raw-model) logprob returned.

    Structured output (at most one of): `json_schema` (a dict or JSON text; output is compact
    JSON valid under it), `regex`, `grammar` (Lark syntax, llguidance dialect) or `choice`
    (one of these strings). Only tokens the constraint allows are sampled, EOS only where it
    is complete, and generation stops when nothing more can follow.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    n: int = 1
    best_of: int | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.stop is None or isinstance(self.stop, list | tuple), "stop",
               f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, list | tuple),
               "stop_token_ids", f"stop_token_ids must be a list of token ids, got "
               f"{type(self.stop_token_ids).__name__}")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            _check(is_finite_real(value), name,
                   f"{name} must be a finite number, got {value!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name,
                   f"{name} must be True or False, got {value!r}")
        _check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.temperature >= 0, "temperature", "temperature must be >= 0 (0 is greedy), got "
               f"{self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(is_int(self.top_k) and self.top_k >= -1, "top_k",
               f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**63), "seed",
               f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                   f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for i, s in enumerate(self.stop):
            check_text(s, f"stop[{i}]")
            _check(bool(s), f"stop[{i}]", f"stop strings must be non-empty, got {self.stop!r}")
        _check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        _check(is_int(self.n) and self.n >= 1, "n", f"n must be an integer >= 1, got {self.n!r}")
        _check(self.best_of is None or (is_int(self.best_of) and self.best_of >= self.n),
               "best_of",
               f"best_of must be an integer >= n ({self.n}), got {self.best_of!r}")
        self._check_logit_bias()
        check_constraint(self)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        _check(isinstance(bias, dict), "logit_bias",
               f"logit_bias must map token ids to biases, got {type(bias).__name__}")
        _check(len(bias) <= MAX_LOGIT_BIAS, "logit_bias",
               f"logit_bias has {len(bias)} token ids; at most {MAX_LOGIT_BIAS} are allowed")
        for token, value in bias.items():
            _check(is_int(token) and token >= 0, "logit_bias",
                   f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            _check(is_finite_real(value) and -MAX_BIAS <= value <= MAX_BIAS, "logit_bias",
                   f"logit_bias[{token}] must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                   f"got {value!r}")
        self.logit_bias = {int(t): float(v) for t, v in bias.items()} or None

    @property
    def num_sequences(self) -> int:
        """Sequences generated per prompt."""
        return self.best_of or self.n

    @property
    def needs_sort(self) -> bool:
        """Whether sampling needs the sorted logits (the step's costly variant): truncation
        (top-k, top-p, min-p) of a sampled row, or top logprobs."""
        truncates = self.top_k > 0 or self.top_p < 1 or self.min_p > 0
        return (self.temperature > 0 and truncates) or self.logprobs is not None

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) is not None for n in CONSTRAINTS)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)
