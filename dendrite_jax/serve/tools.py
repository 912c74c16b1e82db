"""Tool calling for a chat request: `tools`, `tool_choice` and `parallel_tool_calls` checked
as OpenAI checks them, and the plan the route follows (`plan_tools` -> `ToolPlan`).

`tool_choice` "auto" (the default with tools) shows the model its tools and parses its output
for calls; "none" (the default without) leaves tools out of the prompt and reads the output
as plain content; "required" and a named function force calls with an llguidance grammar in
the parser's format over the functions' JSON schemas, so that the output always parses: one
call or more ("required"; exactly one where `parallel_tool_calls` is false), or exactly one
call of the named function. Each call's name is bound to its own function's schema.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import llguidance

from dendrite_jax.serve.errors import ApiError
from dendrite_jax.serve.tool_parsers import (
    HermesToolParser,
    PlainText,
    ToolCallStream,
    ToolOutput,
    ToolParser,
)

# Keywords that let an object schema admit properties beyond `properties`.
_OPEN_ENDED = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf",
               "anyOf", "oneOf", "$ref", "if", "dependentSchemas")
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Arguments under a forced call: no free whitespace (a small model given it can write
# newlines until it runs out of tokens), and json.dumps' separators, as templates render
# prior calls (`tojson`), so the model writes calls as it has seen them.
ARGUMENT_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ",
                         "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tool fields ask of the route.

    `tools`: pass to `Tokenizer.apply_chat_template(tools=...)` (None: no tools in the
    prompt). `grammar`: put in `SamplingParams(grammar=...)` (None: unconstrained).
    `parser`: the format the output is read in (None: plain content); read it with `parse`
    or `stream`. `forced`: the grammar makes the output calls only. `parallel`: more than
    one call may be read (False: calls after the first are dropped). `named`: the function
    a named tool_choice forces.
    """

    tools: list[dict] | None
    grammar: str | None
    parser: type[ToolParser] | None
    forced: bool
    parallel: bool = True
    named: str | None = None

    def parse(self, text: str) -> ToolOutput:
        """A finished output's content and calls."""
        return (self.parser or PlainText).parse(text, self.parallel)

    def stream(self) -> ToolCallStream:
        """A reader for one streamed output (one per choice): `push` each text delta, then
        `finish`; each returns OpenAI chat deltas (`serve.tool_parsers`)."""
        return (self.parser or PlainText).stream(self.parallel)

    def finish_reason(self, reason: str | None, output: ToolOutput) -> str | None:
        """The choice's finish_reason: "tool_calls" where the model stopped after calling
        ("auto" or "required"); a named function's call keeps "stop", as OpenAI answers."""
        if output.tool_calls and reason == "stop" and self.named is None:
            return "tool_calls"
        return reason


NO_TOOLS = ToolPlan(None, None, None, False)


def plan_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None,
               parser: type[ToolParser] = HermesToolParser) -> ToolPlan:
    """The request's ToolPlan, from its `tools`, `tool_choice` and `parallel_tool_calls`
    (as sent: None where absent) and the model's format (`tool_parsers.parser_for_template`).
    Raises ApiError (400) naming the field at fault. An empty `tools` list is no tools."""
    functions = _functions(tools)
    parallel = _parallel(parallel_tool_calls)
    choice = _choice(tool_choice, functions)
    if choice == "none" or not functions:
        return NO_TOOLS
    tools = [{"type": "function", "function": f} for f in functions.values()]
    if choice == "auto":
        return ToolPlan(tools, None, parser, False, parallel)
    if choice == "required":
        chosen = functions
    else:
        chosen, parallel = {choice: functions[choice]}, False
    _check_schemas(functions, chosen)
    return ToolPlan(tools, calls_grammar(chosen, parser, parallel), parser, True, parallel,
                    None if choice == "required" else choice)


def calls_grammar(functions: dict[str, dict], parser: type[ToolParser],
                  parallel: bool) -> str:
    """Lark (llguidance's dialect) for calls of `functions` (name -> OpenAI function object)
    in `parser`'s format: each call one of the names with that function's arguments."""
    key = json.dumps(parser.arguments_key)
    rules = [parser.lark_start(parallel), "call: " + " | ".join(
        f"call_{i}" for i in range(len(functions)))]
    for i, (name, function) in enumerate(functions.items()):
        head = json.dumps(f'{{"name": {json.dumps(name)}, {key}: ')
        rules.append(f'call_{i}: {head} arguments_{i} "}}"')
        rules.append(f"arguments_{i}: %json {json.dumps(_arguments_schema(function))}")
    return "\n".join(rules) + "\n"


def _arguments_schema(function: dict) -> dict:
    """The function's parameters schema as forced calls follow it: an object, with only the
    properties it names where it says nothing of others (as OpenAI's strict mode; JSON
    Schema's default admits any, and a small model forced to write JSON invents many), and
    without free whitespace (`ARGUMENT_JSON_OPTIONS`). What it allows is valid under the
    schema as given."""
    schema = dict(function.get("parameters") or EMPTY_PARAMETERS)
    schema.setdefault("type", "object")
    if "properties" in schema and not any(k in schema for k in _OPEN_ENDED):
        schema["additionalProperties"] = False
    schema["x-guidance"] = {**ARGUMENT_JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return schema


# --------------------------------------------------------------------------- checks

def _functions(tools: Any) -> dict[str, dict]:
    """name -> function object of each tool, checked."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise ApiError(400, f"'tools' must be a list of tools, got {type(tools).__name__}",
                       "tools")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, f"'{where}.type' must be 'function' (the only kind of tool "
                           "this server runs)", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ApiError(400, f"'{where}.function' must be an object with 'name', "
                           "'description' and 'parameters'", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ApiError(400, f"'{where}.function.name' must be 1 to 64 letters, digits, "
                           f"underscores or dashes, got {name!r:.80}", f"{where}.function.name")
        if name in functions:
            raise ApiError(400, f"'tools' names the function {name!r} twice", "tools")
        for field, kind, ok in (("description", "a string", str), ("parameters",
                                "a JSON schema object", dict), ("strict", "a boolean", bool)):
            if function.get(field) is not None and not isinstance(function[field], ok):
                raise ApiError(400, f"'{where}.function.{field}' must be {kind}",
                               f"{where}.function.{field}")
        kind = (function.get("parameters") or EMPTY_PARAMETERS).get("type", "object")
        if kind != "object":
            raise ApiError(400, f"'{where}.function.parameters' must describe an object "
                           f"(type 'object'), got type {kind!r:.40}",
                           f"{where}.function.parameters")
        functions[name] = {k: v for k, v in function.items() if v is not None}
    return functions


def _parallel(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise ApiError(400, f"'parallel_tool_calls' must be a boolean, got {value!r:.40}",
                       "parallel_tool_calls")
    return value


def _choice(tool_choice: Any, functions: dict[str, dict]) -> str:
    """"auto", "none", "required" or the name of the function tool_choice names."""
    if tool_choice is None:
        return "auto" if functions else "none"
    if tool_choice in ("auto", "none", "required"):
        if tool_choice == "required" and not functions:
            raise ApiError(400, "'tool_choice' is 'required' but no 'tools' are given",
                           "tool_choice")
        return tool_choice
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
    function = tool_choice.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be 'auto', 'none', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}, got "
                       f"{tool_choice!r:.80}", "tool_choice")
    if name not in functions:
        raise ApiError(400, f"'tool_choice' names the function {name!r:.80}, which is not "
                       "in 'tools'", "tool_choice")
    return name


def _check_schemas(functions: dict[str, dict], chosen: dict[str, dict]) -> None:
    """ApiError (400) naming the tool whose parameters llguidance cannot enforce, so that a
    forced request fails before it is queued."""
    for i, name in enumerate(functions):
        if name not in chosen:
            continue
        grammar = llguidance.LLMatcher.grammar_from_lark(
            f"start: %json {json.dumps(_arguments_schema(chosen[name]))}")
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ApiError(400, f"'tools[{i}].function.parameters' cannot be enforced: "
                           f"{messages[0] if messages else 'invalid JSON schema'}",
                           f"tools[{i}].function.parameters")
