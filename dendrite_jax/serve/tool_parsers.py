"""Tool-call parsers: a model's output text to OpenAI tool calls, whole or streamed.

A `ToolParser` subclass reads one tool-call format; `TOOL_PARSERS` registers them by name
(`register_tool_parser`), and `parser_for_template` picks the one a chat template's text
names, the Hermes format (`<tool_call>` blocks, what `model.chat_tools` writes for templates
without tools) where none matches. A new format is one subclass with `split` (its reading)
and `lark_start` (its grammar for forced calls, `serve.tools`), plus its registration.

What every format shares (`ToolCallStream`):
- Text outside calls is content; whitespace next to a call is dropped. A call whose JSON is
  malformed, or not {"name": string, "arguments": object}, stays in the content as written,
  markers and all; nothing raises (as vLLM does).
- With `parallel` False, calls after the first are dropped.
- Streamed, `push(text)` returns OpenAI chat `delta`s: {"content": ...} for text that can no
  longer begin a call (text that may be the start of a marker is held back), and for each
  call, once it is complete and parsed, {"tool_calls": [{"index", "id", "type": "function",
  "function": {"name", "arguments": ""}}]} then {"tool_calls": [{"index", "function":
  {"arguments": <the JSON text>}}]}. A call goes out whole, never before its JSON is known to
  parse, so a streamed answer never differs from the whole text's `parse`: for any split of a
  text, the concatenated deltas equal it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import uuid
from typing import Any, ClassVar

from dendrite_jax.model.chat_tools import TOOL_CALL_END, TOOL_CALL_START


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is JSON text of an object (as OpenAI sends it)."""

    name: str
    arguments: str
    id: str = dataclasses.field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass(frozen=True)
class ToolOutput:
    """An output read for tool calls: its content (None where calls left no text) and calls."""

    content: str | None
    tool_calls: list[ToolCall]


Piece = str | ToolCall


class ToolParser(abc.ABC):
    """One tool-call format. An instance reads one output (it may keep state between `split`
    calls); `parse` and `stream` make their own."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]] = ()  # text in a chat template that means this format
    arguments_key: ClassVar[str] = "arguments"  # the call object's key for its arguments

    @abc.abstractmethod
    def split(self, text: str, final: bool) -> tuple[list[Piece], int]:
        """The settled start of `text` as content strings and calls, and its length; the
        rest (which may still become a call) is passed again with more text. With `final`,
        nothing more comes: all of `text` is settled."""

    @classmethod
    @abc.abstractmethod
    def lark_start(cls, parallel: bool) -> str:
        """Lark rules for `start`: one call in this format (several where `parallel`), the
        call's JSON object being the rule `call` (`serve.tools` defines it)."""

    @classmethod
    def stream(cls, parallel: bool = True) -> ToolCallStream:
        return ToolCallStream(cls(), parallel)

    @classmethod
    def parse(cls, text: str, parallel: bool = True) -> ToolOutput:
        stream = cls.stream(parallel)
        stream.push(text)
        stream.finish()
        return stream.output()


class ToolCallStream:
    """Reads one output as it is generated (see the module docstring for the deltas)."""

    def __init__(self, parser: ToolParser, parallel: bool = True) -> None:
        self._parser = parser
        self._max_calls = None if parallel else 1
        self._held = ""  # text not yet settled by the parser
        self._space = ""  # trailing whitespace of the content, dropped if a call follows
        self._after_call = False  # drop the content's whitespace until its next text
        self._content: list[str] = []
        self._finished = False
        self.tool_calls: list[ToolCall] = []

    def push(self, text: str) -> list[dict]:
        """The deltas that `text`, appended to the output, settles (possibly none)."""
        if self._finished:
            raise RuntimeError("push after finish")
        self._held += text
        pieces, used = self._parser.split(self._held, final=False)
        self._held = self._held[used:]
        return self._deltas(pieces)

    def finish(self) -> list[dict]:
        """At the end of the output: the deltas of whatever was held back."""
        if self._finished:
            return []
        self._finished = True
        pieces, _ = self._parser.split(self._held, final=True)
        self._held = ""
        deltas = self._deltas(pieces)
        if self._space:  # no call follows: the whitespace is content after all
            self._content.append(self._space)
            deltas = _merged([*deltas, {"content": self._space}])
            self._space = ""
        return deltas

    def output(self) -> ToolOutput:
        """What the deltas so far add up to."""
        content = "".join(self._content)
        return ToolOutput(content or None if self.tool_calls else content, list(self.tool_calls))

    def _deltas(self, pieces: list[Piece]) -> list[dict]:
        out: list[dict] = []
        for piece in pieces:
            if isinstance(piece, ToolCall):
                self._space, self._after_call = "", True
                if self._max_calls is None or len(self.tool_calls) < self._max_calls:
                    out += _call_deltas(len(self.tool_calls), piece)
                    self.tool_calls.append(piece)
                continue
            if self._after_call:
                piece = piece.lstrip()
                if not piece:
                    continue
                self._after_call = False
            text = self._space + piece
            body = text.rstrip()
            self._space = text[len(body):]
            if body:
                self._content.append(body)
                out.append({"content": body})
        return _merged(out)


def _call_deltas(index: int, call: ToolCall) -> list[dict]:
    first = {"index": index, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": ""}}
    rest = {"index": index, "function": {"arguments": call.arguments}}
    return [{"tool_calls": [first]}, {"tool_calls": [rest]}]


def _merged(deltas: list[dict]) -> list[dict]:
    """Adjacent content deltas as one."""
    out: list[dict] = []
    for d in deltas:
        if out and "content" in d and "content" in out[-1]:
            out[-1] = {"content": out[-1]["content"] + d["content"]}
        else:
            out.append(d)
    return out


# --------------------------------------------------------------------------- JSON calls

def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def _loads(text: str) -> Any:
    """`text` as JSON, or None where it is not (NaN and Infinity included)."""
    try:
        return _DECODER.decode(text.strip())
    except (ValueError, RecursionError):
        return None


def call_from_json(obj: Any, keys: tuple[str, ...] = ("arguments", "parameters")
                   ) -> ToolCall | None:
    """The call a decoded JSON object writes ({"name": ..., <one of keys>: {...}}; arguments
    absent are {}, arguments written as JSON text are read), or None where it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in keys if k in obj), {})
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _lark(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- registry

TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(cls: type[ToolParser]) -> type[ToolParser]:
    """Class decorator: make `cls` known by its `name` (its `markers` are checked in
    registration order by `parser_for_template`)."""
    TOOL_PARSERS[cls.name] = cls
    return cls


def get_tool_parser(name: str) -> type[ToolParser]:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]


def parser_for_template(chat_template: str | None) -> type[ToolParser]:
    """The format a chat template writes calls in: the first registered parser whose marker
    its text holds, else Hermes (the default format, `model.chat_tools`)."""
    for cls in TOOL_PARSERS.values():
        if chat_template and any(m in chat_template for m in cls.markers):
            return cls
    return HermesToolParser


# --------------------------------------------------------------------------- formats

@register_tool_parser
class HermesToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks anywhere in
    the text (Hermes 2 Pro, Qwen2.5 and Qwen3, and any model given our default format);
    several blocks are parallel calls. A last block left open at the end (its end marker cut
    by a stop string) is a call where its JSON is whole."""

    name = "hermes"
    markers = (TOOL_CALL_START,)

    def split(self, text: str, final: bool) -> tuple[list[Piece], int]:
        pieces: list[Piece] = []
        i = 0
        while True:
            start = text.find(TOOL_CALL_START, i)
            if start < 0:
                end = len(text) - (0 if final else _partial_marker(text[i:], TOOL_CALL_START))
                if end > i:
                    pieces.append(text[i:end])
                return pieces, end
            if start > i:
                pieces.append(text[i:start])
            body = start + len(TOOL_CALL_START)
            close = text.find(TOOL_CALL_END, body)
            if close < 0 and not final:
                return pieces, start  # hold the open call until it closes
            stop = len(text) if close < 0 else close + len(TOOL_CALL_END)
            call = call_from_json(_loads(text[body:close if close >= 0 else len(text)]))
            pieces.append(call or text[start:stop])
            i = stop

    @classmethod
    def lark_start(cls, parallel: bool) -> str:
        block = f"{_lark(TOOL_CALL_START + chr(10))} call {_lark(chr(10) + TOOL_CALL_END)}"
        if not parallel:
            return f"start: {block}"
        return f'start: tool_call ({_lark(chr(10))} tool_call)*\ntool_call: {block}'


PYTHON_TAG = "<|python_tag|>"


@register_tool_parser
class Llama3JsonToolParser(ToolParser):
    """Llama 3.1-3.3's JSON calls: the message is `{"name": ..., "parameters": {...}}`,
    optionally after `<|python_tag|>`, several separated by `;`. A message that does not
    start so is all content; text after the calls that is not another call is content."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)
    arguments_key = "parameters"

    def __init__(self) -> None:
        self._mode = "start"  # then "calls" or "text"
        self._separator = False  # a call was read: ";" comes before the next

    def split(self, text: str, final: bool) -> tuple[list[Piece], int]:
        i = 0
        if self._mode == "start":
            body = text.lstrip()
            if not final and (not body or (PYTHON_TAG.startswith(body) and body != PYTHON_TAG)):
                return [], 0  # cannot tell yet
            at = len(text) - len(body)
            if body.startswith(PYTHON_TAG):
                self._mode, i = "calls", at + len(PYTHON_TAG)
            elif body.startswith("{"):
                self._mode, i = "calls", at
            else:
                self._mode = "text"
        pieces: list[Piece] = []
        while self._mode == "calls":
            j = len(text) - len(text[i:].lstrip())
            if j == len(text):
                return pieces, len(text) if final else i
            if self._separator and text[j] == ";":
                i, self._separator = j + 1, False
                continue
            if self._separator or text[j] != "{":
                self._mode = "text"
                break
            try:
                obj, end = _DECODER.raw_decode(text, j)
            except (ValueError, RecursionError):  # unfinished, or malformed
                if not final:
                    return pieces, i
                self._mode = "text"
                break
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                self._mode = "text"
                break
            pieces.append(call)
            i, self._separator = end, True
        if len(text) > i:
            pieces.append(text[i:])
        return pieces, len(text)

    @classmethod
    def lark_start(cls, parallel: bool) -> str:
        return f"start: call ({_lark('; ')} call)*" if parallel else "start: call"


class PlainText(ToolParser):
    """No tool calls: all text is content (the route's parser where tools are off)."""

    name = "none"

    def split(self, text: str, final: bool) -> tuple[list[Piece], int]:
        return ([text] if text else []), len(text)

    @classmethod
    def lark_start(cls, parallel: bool) -> str:
        raise ValueError("plain text has no tool-call grammar")
