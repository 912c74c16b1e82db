"""/tokenize and /detokenize in vLLM's shapes.

/tokenize takes a completion's `prompt` (with `add_special_tokens`, default true) or a chat's
`messages` and `tools` (rendered by the chat template, as the chat route renders them) and answers
`{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` with `return_token_strs`).
/detokenize takes `{"tokens": [...]}` and answers `{"prompt": text}`. Both check `model` when
given, as vLLM does; bad input is an ApiError naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve.errors import ApiError
from dendrite_jax.serve.protocol import chat_messages, completion_prompt
from dendrite_jax.validation import is_int


def _object(body: Any, model_name: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves "
                       f"{model_name!r}", "model", code="model_not_found")
    return body


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {value!r:.40}", name)
    return value


def tokenize(body: Any, tokenizer: Tokenizer, model_name: str, max_model_len: int,
             max_prompt_chars: int | None,
             render: Callable[..., list[int]]) -> dict:
    """The /tokenize answer (run off the event loop: it tokenises and renders templates)."""
    body = _object(body, model_name)
    if "messages" in body:
        tokens = render(tokenizer, chat_messages(body, max_prompt_chars),
                        tools=body.get("tools") or None)
    elif "prompt" in body:
        special = _flag(body, "add_special_tokens", True)
        tokens = completion_prompt(body, tokenizer, max_prompt_chars, special)[1]
    else:
        raise ApiError(400, "give 'prompt' (text or token ids) or 'messages'", "prompt")
    strs = None
    if _flag(body, "return_token_strs", False):
        strs = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
            "token_strs": strs}


def detokenize(body: Any, tokenizer: Tokenizer, model_name: str, vocab_size: int) -> dict:
    """The /detokenize answer: the text of `tokens` (special tokens included)."""
    body = _object(body, model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_int(t) and 0 <= t < vocab_size
                                               for t in tokens):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab_size})",
                       "tokens")
    return {"prompt": tokenizer.decode(tokens, skip_special_tokens=False)}
