"""Tool-call parsers: whole outputs, malformed calls kept as content, and streams that give the
same calls and content as the whole text however the text is split (hypothesis)."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.model.chat_tools import tool_call_text
from dendrite_jax.serve import tool_parsers
from dendrite_jax.serve.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    ToolCall,
    ToolParser,
    get_tool_parser,
    parser_for_template,
    register_tool_parser,
)


def calls(output) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in output.tool_calls]


def hermes(name: str, arguments: dict) -> str:
    return tool_call_text(name, arguments)


# ------------------------------------------------------------------------------- Hermes

def test_hermes_calls_and_content():
    text = ("Let me check.\n" + hermes("get_weather", {"city": "Paris"}) + "\n"
            + hermes("get_time", {}) + "\n")
    out = HermesToolParser.parse(text)
    assert out.content == "Let me check."
    assert calls(out) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c.id.startswith("call_") for c in out.tool_calls)
    assert out.tool_calls[0].id != out.tool_calls[1].id
    assert out.tool_calls[0].to_openai() == {
        "id": out.tool_calls[0].id, "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    # Calls alone: content None (OpenAI's null). No calls: the text as it is.
    assert HermesToolParser.parse(hermes("f", {"a": [1, 2]})).content is None
    assert HermesToolParser.parse("  Just text.\n") == tool_parsers.ToolOutput(
        "  Just text.\n", [])
    # Text between and after calls is content; the whitespace next to calls is not.
    out = HermesToolParser.parse(f"A {hermes('f', {})}  B  {hermes('g', {})} C")
    assert out.content == "ABC" and [c.name for c in out.tool_calls] == ["f", "g"]


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"a": 1}',  # unbalanced
    '{"arguments": {"a": 1}}',  # no name
    '{"name": "", "arguments": {}}',
    '{"name": "f", "arguments": [1]}',  # arguments not an object
    '{"name": "f", "arguments": {"a": NaN}}',  # not JSON
    '["f"]',
    "not json at all",
])
def test_malformed_calls_stay_content(body):
    text = f"Hi <tool_call>\n{body}\n</tool_call> then {hermes('ok', {})}"
    out = HermesToolParser.parse(text)
    assert out.content == f"Hi <tool_call>\n{body}\n</tool_call> then"
    assert calls(out) == [("ok", {})]


def test_hermes_variants():
    # "parameters" for "arguments", arguments as JSON text, no arguments, no newlines.
    text = ('<tool_call>{"name": "a", "parameters": {"x": 1}}</tool_call>'
            '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
            '<tool_call>{"name": "c"}</tool_call>')
    assert calls(HermesToolParser.parse(text)) == [("a", {"x": 1}), ("b", {"y": 2}), ("c", {})]
    # A last call whose end marker was cut (a stop string) is a call if its JSON is whole.
    assert calls(HermesToolParser.parse('<tool_call>\n{"name": "a"}\n')) == [("a", {})]
    cut = '<tool_call>\n{"name": "a", "argu'
    assert HermesToolParser.parse(cut) == tool_parsers.ToolOutput(cut, [])
    # Non-ASCII arguments are kept as text, not escaped.
    out = HermesToolParser.parse(hermes("f", {"city": "Zürich"}))
    assert out.tool_calls[0].arguments == '{"city": "Zürich"}'


def test_parallel_false_keeps_the_first_call():
    text = hermes("a", {}) + "\n" + hermes("b", {}) + "\ndone"
    out = HermesToolParser.parse(text, parallel=False)
    assert calls(out) == [("a", {})] and out.content == "done"


def test_stream_deltas_are_openai_shaped():
    stream = HermesToolParser.stream()
    deltas = []
    for piece in ["Sure", ". <tool", "_call>\n{\"name\": \"f\", ", '"arguments": {"a": 1}}',
                  "\n</tool_call>", "\n<tool_c", "all>\n{\"name\": \"g\"}\n</tool_call>"]:
        deltas.append(stream.push(piece))
    deltas.append(stream.finish())
    assert deltas[0] == [{"content": "Sure"}]
    assert deltas[1] == [{"content": "."}]  # " <tool" held: it may start a call
    assert deltas[2] == deltas[3] == []  # a call goes out once it is complete
    first, rest = deltas[4]
    call_id = first["tool_calls"][0]["id"]
    assert first == {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                     "function": {"name": "f", "arguments": ""}}]}
    assert rest == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]}
    assert deltas[5] == []
    assert [d["tool_calls"][0]["index"] for d in deltas[6]] == [1, 1]
    assert deltas[7] == []
    assert stream.output().content == "Sure." and len(stream.tool_calls) == 2
    assert stream.finish() == []
    with pytest.raises(RuntimeError, match="push after finish"):
        stream.push("more")


# ------------------------------------------------------------------------------- Llama 3

def llama(name: str, parameters: dict) -> str:
    return json.dumps({"name": name, "parameters": parameters})


def test_llama3_json_calls():
    parse = Llama3JsonToolParser.parse
    one = llama("get_weather", {"city": "Paris"})
    assert calls(parse(one)) == [("get_weather", {"city": "Paris"})]
    assert parse(one).content is None
    assert calls(parse(f"<|python_tag|>{one}")) == calls(parse(one))
    two = f" {one}; {llama('get_time', {'tz': 'CET'})}"
    assert calls(parse(two)) == [("get_weather", {"city": "Paris"}),
                                 ("get_time", {"tz": "CET"})]
    # Text after the calls is content.
    assert parse(f"{one} Done.").content == "Done."
    # A message that does not start with a call is all content.
    for text in [f"Here: {one}", '{"city": "Paris"}', '{"name": "f", "parameters": 3}',
                 "{not json", "  plain  "]:
        assert parse(text) == tool_parsers.ToolOutput(text, []), text
    assert calls(parse('{"name": "f", "arguments": {"a": 1}}')) == [("f", {"a": 1})]


# ------------------------------------------------------------------------------- streams

def stream_split(parser: type[ToolParser], text: str, cuts: list[int], parallel: bool = True):
    """Stream `text` cut at `cuts`; return (content, calls) rebuilt from the deltas, checking
    each delta's shape on the way."""
    stream = parser.stream(parallel)
    bounds = [0, *sorted(set(cuts)), len(text)]
    deltas = [d for a, b in zip(bounds, bounds[1:], strict=False) for d in stream.push(text[a:b])]
    deltas += stream.finish()
    content, rebuilt = "", []
    for d in deltas:
        assert len(d) == 1
        if "content" in d:
            assert d["content"]
            content += d["content"]
            continue
        (call,) = d["tool_calls"]
        if call["index"] == len(rebuilt):  # a new call: its header first
            assert set(call) == {"index", "id", "type", "function"}
            assert call["type"] == "function" and call["function"]["arguments"] == ""
            rebuilt.append([call["function"]["name"], ""])
        else:
            assert call["index"] == len(rebuilt) - 1 and set(call) == {"index", "function"}
            rebuilt[-1][1] += call["function"]["arguments"]
    assert stream.output().content == (content or None if rebuilt else content)
    return content, [(name, json.loads(args)) for name, args in rebuilt]


def whole(parser: type[ToolParser], text: str, parallel: bool = True):
    out = parser.parse(text, parallel)
    return out.content or "", calls(out)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
arguments = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_-]{0,10}", fullmatch=True)
# Text with the characters and marker pieces that make splitting hard.
tricky_text = st.lists(st.sampled_from(
    ["<", "<tool", "<tool_call", "</tool_call>", "<tool_call>", "{", "}", ";", " ", "\n",
     '"name"', "<|python_tag|>", "<|python", "a", "Hé", "😀", "x y"]), max_size=8).map("".join)


@st.composite
def hermes_texts(draw):
    parts = draw(st.lists(st.one_of(
        st.tuples(names, arguments).map(lambda c: hermes(*c)), tricky_text,
        st.text(max_size=10), st.just("<tool_call>\n{broken\n</tool_call>")), max_size=6))
    return "".join(parts)


@st.composite
def llama_texts(draw):
    objects = draw(st.lists(st.tuples(names, arguments).map(lambda c: llama(*c)),
                            min_size=1, max_size=3))
    head = draw(st.sampled_from(["", " ", "<|python_tag|>", "\n<|python_tag|>"]))
    sep = draw(st.sampled_from([";", "; ", " ;\n"]))
    tail = draw(st.one_of(st.just(""), tricky_text, st.text(max_size=8)))
    return draw(st.one_of(st.just(head + sep.join(objects) + tail), tricky_text,
                          st.text(max_size=20)))


cut_lists = st.lists(st.integers(min_value=0, max_value=400), max_size=12)


@settings(max_examples=300, deadline=None)
@given(hermes_texts(), cut_lists, st.booleans())
def test_hermes_stream_matches_whole_text(text, cuts, parallel):
    assert stream_split(HermesToolParser, text, cuts, parallel) == whole(
        HermesToolParser, text, parallel)


@settings(max_examples=300, deadline=None)
@given(llama_texts(), cut_lists, st.booleans())
def test_llama3_stream_matches_whole_text(text, cuts, parallel):
    assert stream_split(Llama3JsonToolParser, text, cuts, parallel) == whole(
        Llama3JsonToolParser, text, parallel)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, arguments), max_size=4),
       st.text(alphabet=st.characters(blacklist_characters="<"), max_size=20), cut_lists)
def test_hermes_finds_every_call_written(written, prefix, cuts):
    """Calls written in the format (as the default template writes them) come back, in
    order, streamed or not; text with no marker in it stays content."""
    text = prefix + "\n".join(hermes(n, a) for n, a in written)
    content, found = stream_split(HermesToolParser, text, cuts)
    assert found == [(n, a) for n, a in written]
    assert content == (prefix.rstrip() if written else prefix)


# ------------------------------------------------------------------------------- registry

def test_registry_and_template_defaults():
    assert get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    with pytest.raises(ValueError, match="unknown tool parser 'nope'; known: hermes, "
                       "llama3_json"):
        get_tool_parser("nope")
    qwen = "{%- for tool in tools %}...<tool_call>\\n{\"name\": <function-name>...{%- endfor %}"
    llama31 = ('{{- "<|python_tag|>" + tool_call.name }}{{- \'{"name": "\' + tool_call.name + '
               "'\", \"parameters\": ' }}")
    smollm = "{% for message in messages %}{{'<|im_start|>' + message['role']}}{% endfor %}"
    assert parser_for_template(qwen) is HermesToolParser
    assert parser_for_template(llama31) is Llama3JsonToolParser
    assert parser_for_template(smollm) is HermesToolParser  # the default format
    assert parser_for_template(None) is HermesToolParser


def test_a_new_format_is_one_class_and_its_registration():
    class Bracketed(ToolParser):
        """`[[name]]` calls with no arguments (a toy format)."""

        name = "bracketed"
        markers: ClassVar[tuple[str, ...]] = ("[[",)

        def split(self, text, final):
            if "[[" not in text or "]]" not in text:
                return ([], 0) if not final else ([text] if text else [], len(text))
            start, end = text.index("[["), text.index("]]")
            return [text[:start], ToolCall(text[start + 2:end], "{}")], end + 2

        @classmethod
        def lark_start(cls, parallel):
            return 'start: "[[" call "]]"'

    try:
        register_tool_parser(Bracketed)
        assert parser_for_template("... [[tool]] ...") is Bracketed
        out = get_tool_parser("bracketed").parse("go [[ping]]")
        assert out.content == "go" and calls(out) == [("ping", {})]
    finally:
        tool_parsers.TOOL_PARSERS.pop("bracketed")
