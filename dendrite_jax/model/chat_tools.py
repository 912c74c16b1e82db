"""Chat messages with tools, as chat templates take them, and the default tool format.

`chat_messages` checks messages in OpenAI's shapes (a user, system or assistant turn; an
assistant turn with `tool_calls`, its `content` None or absent; a `tool` turn with its
result) and returns them as Hugging Face templates read them: keys whose value is None
dropped, and each tool call's `arguments` parsed from OpenAI's JSON string to a dict.
Templates differ in what they accept there (Qwen2.5 and Llama 3.1 write `arguments | tojson`,
which double-encodes a string; Hermes and Qwen3 take either), so we follow transformers,
whose server parses the string because "chat templates iterate it as a mapping".
`chat_tools` checks `tools` (OpenAI tool objects, passed to templates as they are).

A template that does not read `tools` cannot show a model its tools, so `default_format`
rewrites the conversation in the Hermes/Qwen format, the default of `serve.tool_parsers`:
the tools' signatures in `<tools></tools>` in the system message, each prior tool call as
`<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` in its assistant turn, and tool
results as `<tool_response>` blocks in a user turn.
"""

from __future__ import annotations

import json
from typing import Any

from dendrite_jax.validation import ParamError, check_text

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def chat_messages(messages: Any) -> list[dict]:
    """`messages` checked (every string is Unicode text; ParamError names the field) and
    copied in the shape templates read (see the module docstring)."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"messages must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        may_omit_content = bool(calls) and m.get("role") == "assistant"
        if not isinstance(m, dict) or "role" not in m or (
                "content" not in m and not may_omit_content):
            raise ValueError(f"{where} needs 'role' and 'content', got {m!r}")
        check_text(m["role"], f"{where}['role']")
        if m.get("content") is not None or not may_omit_content:
            check_text(m["content"], f"{where}['content']")
        check_json_strings(m, where)
        message = {k: v for k, v in m.items() if v is not None}
        if calls is not None:
            message["tool_calls"] = _tool_calls(calls, f"{where}['tool_calls']")
        out.append(message)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list | tuple):
        raise ParamError(where, f"{where} must be a list of tool calls")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ParamError(f"{where}[{j}]", f"{where}[{j}] must be a tool call "
                             "{'id', 'type': 'function', 'function': {'name', 'arguments'}}")
        arguments = call_arguments(function.get("arguments"),
                                   f"{where}[{j}]['function']['arguments']")
        out.append({**{k: v for k, v in call.items() if v is not None},
                    "function": {**function, "arguments": arguments}})
    return out


def call_arguments(arguments: Any, where: str) -> dict:
    """A tool call's arguments as a dict: OpenAI's JSON text parsed (None or "" is {})."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ParamError(where, f"{where} is not valid JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ParamError(where, f"{where} must be a JSON object, got "
                         f"{type(arguments).__name__}")
    check_json_strings(arguments, where)  # JSON text may escape a lone surrogate
    return arguments


def chat_tools(tools: Any) -> list[dict] | None:
    """`tools` checked (a list of objects, every string Unicode text); None where empty."""
    if tools is None:
        return None
    if not isinstance(tools, list | tuple) or not all(isinstance(t, dict) for t in tools):
        raise ParamError("tools", "tools must be a list of tool objects ({'type': 'function', "
                         "'function': {'name', 'description', 'parameters'}})")
    check_json_strings(list(tools), "tools")
    return list(tools) or None


def check_json_strings(value: Any, where: str) -> None:
    """Every string in `value` (keys included) is Unicode text, and every value is JSON data:
    templates run sandboxed, but on plain data only."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_text(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                check_text(key, f"a key of {path}")
                stack.append((sub, f"{path}[{key!r}]"))
        elif isinstance(item, list | tuple):
            stack.extend((sub, f"{path}[{k}]") for k, sub in enumerate(item))
        elif item is not None and type(item) not in (bool, int, float):
            raise ParamError(path, f"{path} must be JSON data, got {type(item).__name__}")


# ------------------------------------------------------------------------ default format

def tool_call_text(name: str, arguments: dict) -> str:
    """One call in the default format (as Qwen2.5's template writes it)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{call}\n{TOOL_CALL_END}"


def tools_prompt(tools: list[dict]) -> str:
    """The system text giving `tools` and the default call format."""
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                               for t in tools))


def default_format(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` (from `chat_messages`) as plain role/content turns in the default tool
    format, for a template that does not read `tools`: the tools' prompt ends the first
    system message (or is one, put first), assistant tool calls are written into its content,
    and each run of `tool` results becomes one user turn of `<tool_response>` blocks. Other
    messages pass unchanged."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            block = f"{TOOL_RESPONSE_START}\n{m['content']}\n{TOOL_RESPONSE_END}"
            if i and messages[i - 1]["role"] == "tool":  # one user turn per run of results
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = [tool_call_text(c["function"]["name"], c["function"]["arguments"])
                     for c in m["tool_calls"]]
            text = "\n".join(([m["content"]] if m.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        else:
            out.append(m)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{tools_prompt(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out
