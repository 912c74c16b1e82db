"""OpenAI-compatible request parsing and response shapes (completions and chat completions).

`decode_body` turns the request's bytes into JSON, refusing what JSON or the engine cannot take
(NaN and Infinity, lone surrogates, deep nesting) with the path of the value at fault.
`parse_completion` / `parse_chat` turn that JSON into a `Parsed` request (prompt, prompt ids,
SamplingParams, stream flag) or raise `ApiError` with the HTTP status and the field at fault;
the engine's own validation (`SamplingParams`, prompt length) surfaces the same way. They
tokenise and render templates, so the server runs them off its event loop. Fields outside
OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `regex`, `choice`, `grammar`)
are accepted as vLLM accepts them. Every error message is one line (`errors.one_line`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.step_plan import SAMPLING_FIELDS
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve.errors import ApiError
from dendrite_jax.validation import is_finite_real, is_int, is_unicode

# request field -> SamplingParams field: every per-row sampling field of the step plan
# (declared once, `step_plan.SAMPLING_FIELDS`), then the ones the host handles.
_SAMPLING_FIELDS = {f.name: f.name for f in SAMPLING_FIELDS} | {
    name: name for name in ("stop", "ignore_eos", "regex", "choice", "grammar")}
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None,
                "tools": None, "functions": None}
MAX_DEPTH = 64  # JSON nesting a request may have (a JSON schema's included)


def _is_strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# The JSON type each sampling field must have: a wrong type is refused here, naming the field,
# before SamplingParams or the engine thread sees it. Values are checked by SamplingParams.
_FIELD_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    **{name: (is_finite_real, "a number") for name in (
        "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty")},
    **{name: (is_int, "an integer") for name in ("top_k", "seed")},
    "ignore_eos": (lambda v: isinstance(v, bool), "a boolean"),
    "regex": (lambda v: isinstance(v, str), "a string"),
    "grammar": (lambda v: isinstance(v, str), "a string"),
    "choice": (_is_strings, "a list of strings"),
    "stop": (lambda v: isinstance(v, str) or _is_strings(v), "a string or a list of strings"),
}


@dataclasses.dataclass(frozen=True)
class Parsed:
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    model: str
    prompt_field: str = "prompt"  # the request field the prompt came from

    @property
    def constraint_field(self) -> str | None:
        """The request field holding the request's constraint, if it has one."""
        for name in ("regex", "grammar", "choice"):
            if getattr(self.params, name) is not None:
                return name
        return "response_format" if self.params.json_schema is not None else None

    def param_for(self, error: ValueError) -> str | None:
        """The request field an engine's refusal at admission is about: the prompt (empty,
        bad ids, too long) or max_tokens (`ParamError.param`), else the constraint."""
        param = getattr(error, "param", None)
        if param == "prompt":
            return self.prompt_field
        return param or self.constraint_field


class _NonFinite:
    """Stands in for NaN or Infinity while a body is decoded, so its path can be named."""


_NON_FINITE = _NonFinite()


def _finite_float(text: str) -> float | _NonFinite:
    value = float(text)  # 1e999 is inf
    return value if math.isfinite(value) else _NON_FINITE


def decode_body(raw: bytes) -> Any:
    """The request's JSON; raises ApiError (400) for text that is not JSON, NaN, Infinity
    and numbers too large for a float, lone surrogates (text that is not Unicode, which the
    tokenizer cannot encode) and nesting deeper than MAX_DEPTH, naming the value's path."""
    try:
        body = json.loads(raw, parse_constant=lambda _: _NON_FINITE,
                          parse_float=_finite_float)
    except RecursionError as e:
        raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of 5,000 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e
    _check_values(body)
    return body


def _check_values(body: Any) -> None:
    """Walk the decoded body (iteratively: depth is what is checked) for values JSON should
    not carry."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            field = path.split(".")[0].split("[")[0]  # the top-level field, not its depths
            raise ApiError(400, f"the request body nests deeper than {MAX_DEPTH} levels",
                           _param(field))
        if value is _NON_FINITE:
            raise ApiError(400, f"'{path}' must be a finite number (JSON has no NaN or "
                           "Infinity)", _param(path))
        if isinstance(value, str) and not is_unicode(value):
            raise ApiError(400, f"'{path or 'body'}' is not valid Unicode text (it holds a "
                           "lone surrogate)", _param(path))
        if isinstance(value, dict):
            for key, item in value.items():
                if not is_unicode(key):
                    raise ApiError(400, f"a key in '{path or 'body'}' is not valid Unicode "
                                   "text (it holds a lone surrogate)", _param(path))
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _param(path: str) -> str | None:
    return path or None


def _check_model(body: dict, model_name: str) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required (a string)", "model")
    if model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves "
                       f"{model_name!r}", "model", code="model_not_found")
    return model


def _sampling(body: dict, max_tokens: int, extra: dict | None = None) -> SamplingParams:
    for field, allowed in _UNSUPPORTED.items():
        if body.get(field, allowed) not in (allowed, None):
            raise ApiError(400, f"'{field}' = {body[field]!r} is not supported by this server",
                           field)
    kwargs = {ours: body[theirs] for theirs, ours in _SAMPLING_FIELDS.items()
              if body.get(theirs) is not None}
    for theirs, ours in _SAMPLING_FIELDS.items():
        is_type, type_name = _FIELD_TYPES.get(theirs, (lambda v: True, ""))
        if ours in kwargs and not is_type(kwargs[ours]):
            raise ApiError(400, f"'{theirs}' must be {type_name}, got {kwargs[ours]!r:.80}",
                           theirs)
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "'logprobs' is not supported by this server yet", "logprobs")
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs, **(extra or {}))
    except ValueError as e:  # a ParamError names the SamplingParams field: "stop[1]", "seed"
        field = getattr(e, "param", "").split("[")[0] or None
        raise ApiError(400, str(e), "response_format" if field in (extra or {}) else field) from e


def _max_tokens(body: dict, field: str, default: int) -> int:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"'{field}' must be a positive integer, got {value!r}", field)
    return value


def _stream(body: dict) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {stream!r}", "stream")
    return stream


def prompt_char_limit(tokenizer: Tokenizer, max_model_len: int) -> int | None:
    """Characters beyond which a text cannot fit `max_model_len` tokens, so it is refused
    without being tokenised; None where no such bound holds. Without a normalizer every
    character of the text is in some token, and no token holds more characters than its
    vocabulary string (byte-level BPE: one per byte; byte fallback `<0x0A>`: more)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None or backend.normalizer is not None:
        return None
    longest = max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=0)
    return max_model_len * longest if longest else None


def _check_prompt_chars(chars: int, limit: int | None, field: str) -> None:
    if limit is not None and chars > limit:
        raise ApiError(400, f"'{field}' has {chars:,} characters: more tokens than the "
                       f"model's context holds ({limit:,} characters at most)", field)


def parse_completion(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                     max_prompt_chars: int | None = None) -> Parsed:
    """A /v1/completions request; tokenises its prompt (the caller runs it off the loop).
    A prompt over `max_prompt_chars` (`prompt_char_limit`) is refused untokenised."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _check_model(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), max_prompt_chars, "prompt")
        text, ids = prompt, tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    params = _sampling(body, _max_tokens(body, "max_tokens", 16), _response_format(body))
    return Parsed(text, ids, params, _stream(body), model)


def _response_format(body: dict) -> dict:
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return {}
    if not isinstance(fmt, dict):
        raise ApiError(400, "'response_format' must be an object", "response_format")
    if fmt.get("type") == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema "
                           "object", "response_format")
        return {"json_schema": spec["schema"]}
    raise ApiError(400, f"unsupported response_format type {fmt.get('type')!r} (use 'text', "
                   "'json_object' or 'json_schema')", "response_format")


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of `messages` under the model's chat template; a template that fails
    (its own `raise_exception`, or any error rendering these messages) is the request's
    fault, answered 400 naming `messages`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True)
    except Exception as e:  # noqa: BLE001 - a template's failure on this input, not ours
        raise ApiError(400, f"the chat template cannot render these messages: {e}",
                       "messages") from e


def parse_chat(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int,
               max_prompt_chars: int | None = None,
               render: Callable[[Tokenizer, list[dict]], list[int]] = render_chat) -> Parsed:
    """A /v1/chat/completions request; `render` gives the prompt ids of its messages (the
    server passes one with a time limit). The caller runs it off the event loop. Messages
    whose contents together pass `max_prompt_chars` are refused unrendered."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _check_model(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    for m in messages:
        if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)):
            raise ApiError(400, "each message needs a 'role' (system, user or assistant) and "
                           f"text 'content'; got {m!r}", "messages")
    _check_prompt_chars(sum(len(m["content"]) for m in messages), max_prompt_chars,
                        "messages")
    ids = render(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages])
    field = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
             else "max_tokens")
    max_tokens = _max_tokens(body, field, max(max_model_len - len(ids), 1))
    params = _sampling(body, max_tokens, _response_format(body))
    return Parsed(None, ids, params, _stream(body), model, "messages")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}]}


def chat_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int,
              completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": text},
                                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]}
