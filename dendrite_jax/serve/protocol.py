"""OpenAI-compatible request parsing and response shapes (completions and chat completions).

`parse_completion` / `parse_chat` turn a JSON body into a `Parsed` request (prompt, prompt ids,
SamplingParams, stream flag) or raise `ApiError` with the HTTP status and the field at fault;
the engine's own validation (`SamplingParams`, prompt length) surfaces the same way. Fields
outside OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `regex`, `choice`,
`grammar`) are accepted as vLLM accepts them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.step_plan import SAMPLING_FIELDS
from dendrite_jax.model.tokenizer import Tokenizer

# request field -> SamplingParams field: every per-row sampling field of the step plan
# (declared once, `step_plan.SAMPLING_FIELDS`), then the ones the host handles.
_SAMPLING_FIELDS = {f.name: f.name for f in SAMPLING_FIELDS} | {
    name: name for name in ("stop", "ignore_eos", "regex", "choice", "grammar")}
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None,
                "tools": None, "functions": None}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                       kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Parsed:
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    model: str


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
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "'logprobs' is not supported by this server yet", "logprobs")
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs, **(extra or {}))
    except (TypeError, ValueError) as e:
        raise ApiError(400, str(e)) from e


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


def parse_completion(body: Any, tokenizer: Tokenizer, model_name: str,
                     max_model_len: int) -> Parsed:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _check_model(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    params = _sampling(body, _max_tokens(body, "max_tokens", 16))
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


def parse_chat(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int) -> Parsed:
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
    try:
        ids = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=True)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    field = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
    max_tokens = _max_tokens(body, field, max(max_model_len - len(ids), 1))
    params = _sampling(body, max_tokens, _response_format(body))
    return Parsed(None, ids, params, _stream(body), model)


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
