"""OpenAI-compatible request parsing and response shapes (completions and chat completions).

`decode_body` turns the request's bytes into JSON, refusing what JSON or the engine cannot take
(NaN and Infinity, lone surrogates, deep nesting) with the path of the value at fault.
`parse_completion` / `parse_chat` turn that JSON into a `Parsed` request (prompt, prompt ids,
SamplingParams, what the answer shows: stream, usage chunk, logprobs, echo) or raise `ApiError`
with the HTTP status and the field at fault;
the engine's own validation (`SamplingParams`, prompt length) surfaces the same way. They
tokenise and render templates, so the server runs them off its event loop. Fields outside
OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `regex`, `choice`, `grammar`)
are accepted as vLLM accepts them, and so is `best_of` in chat. Every error message is one line
(`errors.one_line`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from dendrite_jax.engine.sampling import MAX_LOGPROBS
from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.engine.step_plan import SAMPLING_FIELDS
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve.errors import ApiError
from dendrite_jax.serve.tool_parsers import HermesToolParser, ToolParser
from dendrite_jax.serve.tools import NO_TOOLS, ToolPlan, plan_tools
from dendrite_jax.validation import ParamError, is_finite_real, is_int, is_unicode

# request field -> SamplingParams field: every per-row sampling field of the step plan
# (declared once, `step_plan.SAMPLING_FIELDS`), then the ones the host handles.
_SAMPLING_FIELDS = {f.name: f.name for f in SAMPLING_FIELDS} | {
    name: name for name in ("stop", "ignore_eos", "regex", "choice", "grammar", "n",
                            "best_of")}
_UNSUPPORTED = {"suffix": None, "functions": None, "function_call": None}  # with 400
MAX_DEPTH = 64  # JSON nesting a request may have (a JSON schema's included)


def _is_strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# The JSON type each sampling field must have: a wrong type is refused here, naming the field,
# before SamplingParams or the engine thread sees it. Values are checked by SamplingParams.
_FIELD_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    **{name: (is_finite_real, "a number") for name in (
        "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty")},
    **{name: (is_int, "an integer") for name in ("top_k", "seed", "n", "best_of")},
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
    include_usage: bool = False  # stream: end with a usage chunk (stream_options)
    logprobs: int | None = None  # top logprobs shown per token (None: no logprobs)
    echo: bool = False  # completions: the prompt (and its logprobs) leads each choice
    echo_only: bool = False  # echo with max_tokens 0: the generated token is not shown
    tools: ToolPlan = NO_TOOLS  # chat: the tools shown and how calls are read (`serve.tools`)

    @property
    def constraint_field(self) -> str | None:
        """The request field holding the request's constraint, if it has one."""
        if self.tools.grammar is not None:
            return "tool_choice"
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
    if body.get("logit_bias") is not None:
        kwargs["logit_bias"] = _logit_bias(body["logit_bias"])
    try:
        return SamplingParams(max_tokens=max_tokens, **kwargs, **(extra or {}))
    except ValueError as e:  # a ParamError names the SamplingParams field: "stop[1]", "seed"
        field = getattr(e, "param", "").split("[")[0] or None
        raise ApiError(400, str(e), "response_format" if field == "json_schema" else field) from e


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias, {"token id": bias}, with the ids as ints (values: SamplingParams)."""
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to biases",
                       "logit_bias")
    bias = {}
    for key, bias_value in value.items():
        if not (key.isascii() and key.isdigit() and len(key) < 10):
            raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r:.40}",
                           "logit_bias")
        if not is_finite_real(bias_value):
            raise ApiError(400, f"'logit_bias[{key}]' must be a number, got "
                           f"{bias_value!r:.40}", "logit_bias")
        bias[int(key)] = bias_value
    return bias


def _max_tokens(body: dict, field: str, default: int, minimum: int = 1) -> int:
    value = body.get(field)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum else "an integer >= 0"
        raise ApiError(400, f"'{field}' must be {kind}, got {value!r}", field)
    return value


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from `stream` and `stream_options`."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true",
                       "stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be a boolean, got {usage!r}",
                       "stream_options")
    return stream, usage


def _top_logprobs_count(value: Any, field: str) -> int:
    if not is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"'{field}' must be an integer in [0, {MAX_LOGPROBS}], got "
                       f"{value!r:.40}", field)
    return value


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


def completion_prompt(body: dict, tokenizer: Tokenizer, max_prompt_chars: int | None,
                      add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
    """The request's `prompt` as (text or None, token ids): a string, or a list of token ids
    (one prompt per request). A text over `max_prompt_chars` is refused untokenised."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        _check_prompt_chars(len(prompt), max_prompt_chars, "prompt")
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        text, ids = None, list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt "
                       "per request)", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty", "prompt")
    return text, ids


def parse_completion(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int,
                     max_prompt_chars: int | None = None) -> Parsed:
    """A /v1/completions request; tokenises its prompt (the caller runs it off the loop).
    A prompt over `max_prompt_chars` (`prompt_char_limit`) is refused untokenised."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _check_model(body, model_name)
    text, ids = completion_prompt(body, tokenizer, max_prompt_chars)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ApiError(400, f"'echo' must be a boolean, got {echo!r:.40}", "echo")
    # With echo, max_tokens 0 scores the prompt alone (as eval harnesses ask): one token is
    # generated and not shown.
    max_tokens = _max_tokens(body, "max_tokens", 16, minimum=0 if echo else 1)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _top_logprobs_count(logprobs, "logprobs")
    extra = _response_format(body)
    if logprobs is not None:
        extra["logprobs"] = logprobs
        if echo:
            extra["prompt_logprobs"] = logprobs
    params = _sampling(body, max(max_tokens, 1), extra)
    stream, usage = _stream(body)
    return Parsed(text, ids, params, stream, model, include_usage=usage, logprobs=logprobs,
                  echo=echo, echo_only=max_tokens == 0)


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


def render_chat(tokenizer: Tokenizer, messages: list[dict],
                tools: list[dict] | None = None) -> list[int]:
    """The prompt ids of `messages` (and `tools`) under the model's chat template; a message
    the template cannot take is a 400 naming its field, and a template that fails (its own
    `raise_exception`, or any error rendering these messages) is the request's fault too,
    answered 400 naming `messages`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, tools=tools)
    except ParamError as e:
        raise ApiError(400, str(e), e.param) from e
    except Exception as e:  # noqa: BLE001 - a template's failure on this input, not ours
        raise ApiError(400, f"the chat template cannot render these messages: {e}",
                       "messages") from e


ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_content(content: Any, where: str) -> str | None:
    """A message's content as text: a string, None, or OpenAI's list of text parts (joined
    by newlines, as vLLM joins them); other parts (images, audio) are refused."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = {p.get("type") for p in content}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in content):
            return "\n".join(p["text"] for p in content)
        raise ApiError(400, f"'{where}.content' may hold text parts only (this server reads "
                       f"no {sorted(k for k in kinds if k != 'text' and k)} parts)",
                       f"{where}.content")
    raise ApiError(400, f"'{where}.content' must be a string or a list of text parts",
                   f"{where}.content")


def chat_messages(body: dict, max_prompt_chars: int | None) -> list[dict]:
    """The request's `messages` as the chat template takes them: a role of ROLES
    ("developer" read as "system"), content as text (`_text_content`), an assistant's
    `tool_calls` and a tool result's `tool_call_id` kept (the tokenizer checks them). Messages
    whose text together passes `max_prompt_chars` is refused unrendered."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out, chars = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"'{where}' needs a 'role' ({', '.join(ROLES)}); got "
                           f"{m!r:.80}", where)
        content = _text_content(m.get("content"), where)
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ApiError(400, f"'{where}' needs text 'content'", f"{where}.content")
        message = {"role": "system" if m["role"] == "developer" else m["role"],
                   "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if m.get(key) is not None:
                message[key] = m[key]
        chars += len(content or "") + len(json.dumps(m.get("tool_calls") or ""))
        out.append(message)
    _check_prompt_chars(chars, max_prompt_chars, "messages")
    return out


def parse_chat(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int,
               max_prompt_chars: int | None = None,
               render: Callable[..., list[int]] = render_chat,
               tool_parser: type[ToolParser] = HermesToolParser) -> Parsed:
    """A /v1/chat/completions request; `render` gives the prompt ids of its messages and
    tools (the server passes one with a time limit); `tool_parser` reads the model's tool
    calls (`tool_parsers.parser_for_template`). The caller runs it off the event loop.
    Messages whose contents together pass `max_prompt_chars` are refused unrendered."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _check_model(body, model_name)
    tools = plan_tools(body.get("tools"), body.get("tool_choice"),
                       body.get("parallel_tool_calls"), tool_parser)
    ids = render(tokenizer, chat_messages(body, max_prompt_chars), tools=tools.tools)
    field = ("max_completion_tokens" if body.get("max_completion_tokens") is not None
             else "max_tokens")
    max_tokens = _max_tokens(body, field, max(max_model_len - len(ids), 1))
    extra = _response_format(body)
    wants_logprobs = body.get("logprobs", False)
    if not isinstance(wants_logprobs, bool):
        raise ApiError(400, f"'logprobs' must be a boolean, got {wants_logprobs!r:.40}",
                       "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        top = _top_logprobs_count(top, "top_logprobs")
        if not wants_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top or 0) if wants_logprobs else None
    if logprobs is not None:
        extra["logprobs"] = logprobs
    if tools.grammar is not None:
        other = [f for f in ("response_format", "regex", "grammar", "choice")
                 if body.get(f) not in (None, {"type": "text"})]
        if other:
            raise ApiError(400, f"a forced tool call (tool_choice) cannot be combined with "
                           f"'{other[0]}'", "tool_choice")
        extra["grammar"] = tools.grammar
    params = _sampling(body, max_tokens, extra)
    stream, usage = _stream(body)
    return Parsed(None, ids, params, stream, model, "messages", include_usage=usage,
                  logprobs=logprobs, tools=tools)
