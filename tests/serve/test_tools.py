"""Tool plans: OpenAI-style errors for tools / tool_choice / parallel_tool_calls, the grammar
that forces calls (compiled by our grammar machinery: right names with their own arguments
pass, anything else is refused), and forced calls from the real model that parse and validate
against their schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dendrite_jax import SamplingParams
from dendrite_jax.grammar import GrammarCompiler
from dendrite_jax.serve.errors import ApiError
from dendrite_jax.serve.tool_parsers import HermesToolParser, Llama3JsonToolParser, ToolOutput
from dendrite_jax.serve.tools import NO_TOOLS, plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                   "required": ["timezone"]}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters
TOOLS = [WEATHER, TIME, PING]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


PARIS = call("get_weather", {"city": "Paris", "unit": "celsius"})
CET = call("get_time", {"timezone": "CET"})


# ------------------------------------------------------------------------------- checks

@pytest.mark.parametrize("tools, choice, parallel, param, message", [
    ("get_weather", None, None, "tools", "'tools' must be a list of tools, got str"),
    ([{"type": "code_interpreter"}], None, None, "tools[0].type", "must be 'function'"),
    ([{"type": "function"}], None, None, "tools[0].function", "must be an object"),
    ([{"type": "function", "function": {"name": "get weather"}}], None, None,
     "tools[0].function.name", "1 to 64 letters, digits, underscores or dashes"),
    ([{"type": "function", "function": {"name": "x" * 65}}], None, None,
     "tools[0].function.name", "1 to 64"),
    ([WEATHER, WEATHER], None, None, "tools", "names the function 'get_weather' twice"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, None,
     "tools[0].function.description", "must be a string"),
    ([PING, {"type": "function", "function": {"name": "f", "parameters": "{}"}}], None, None,
     "tools[1].function.parameters", "must be a JSON schema object"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     None, None, "tools[0].function.parameters", "must describe an object"),
    (TOOLS, "sometimes", None, "tool_choice", "must be 'auto', 'none', 'required' or"),
    (TOOLS, {"type": "function"}, None, "tool_choice", "must be 'auto'"),
    (TOOLS, {"type": "other", "function": {"name": "ping"}}, None, "tool_choice",
     "must be 'auto'"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "tool_choice",
     "names the function 'nope', which is not in 'tools'"),
    (None, "required", None, "tool_choice", "'required' but no 'tools'"),
    (None, NAMED_TIME, None, "tool_choice", "not in 'tools'"),
    (TOOLS, "auto", "yes", "parallel_tool_calls", "must be a boolean"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}], "required",
     None, "tools[0].function.parameters", "cannot be enforced"),
])
def test_bad_fields_are_refused_naming_them(tools, choice, parallel, param, message):
    with pytest.raises(ApiError, match=message) as e:
        plan_tools(tools, choice, parallel)
    assert (e.value.status, e.value.param) == (400, param)
    assert e.value.body()["error"]["param"] == param


def test_a_schema_is_compiled_only_where_calls_are_forced():
    unresolvable = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}
    assert plan_tools([unresolvable, PING], "auto").grammar is None
    assert plan_tools([unresolvable, PING], {"type": "function",
                                             "function": {"name": "ping"}}).forced


def test_plans():
    assert plan_tools(None) == NO_TOOLS == plan_tools([]) == plan_tools(None, "auto")
    assert plan_tools(None, "none") == NO_TOOLS
    # "none": tools stay out of the prompt and the output is plain content.
    none = plan_tools(TOOLS, "none")
    assert none == NO_TOOLS and none.parse(PARIS) == ToolOutput(PARIS, [])
    auto = plan_tools(TOOLS, None)
    assert auto == plan_tools(TOOLS, "auto", True)
    assert (auto.grammar, auto.parser, auto.forced, auto.parallel) == (
        None, HermesToolParser, False, True)
    assert auto.tools == [WEATHER, TIME, PING]  # as the template takes them
    assert plan_tools([{"type": "function", "function": {
        "name": "f", "description": None}}]).tools == [{"type": "function",
                                                        "function": {"name": "f"}}]
    required = plan_tools(TOOLS, "required", False)
    assert required.forced and required.grammar and not required.parallel
    assert required.named is None
    named = plan_tools(TOOLS, NAMED_TIME, True)
    assert named.forced and named.named == "get_time" and not named.parallel
    assert named.tools == auto.tools  # the model still sees every tool
    llama = plan_tools(TOOLS, "required", None, Llama3JsonToolParser)
    assert llama.parser is Llama3JsonToolParser and '\\"parameters\\": ' in llama.grammar


def test_finish_reason():
    called = HermesToolParser.parse(PARIS)
    text = HermesToolParser.parse("hello")
    auto, named = plan_tools(TOOLS), plan_tools(TOOLS, NAMED_TIME)
    assert auto.finish_reason("stop", called) == "tool_calls"
    assert plan_tools(TOOLS, "required").finish_reason("stop", called) == "tool_calls"
    assert auto.finish_reason("stop", text) == "stop"
    assert auto.finish_reason("length", called) == "length"
    assert named.finish_reason("stop", called) == "stop"  # as OpenAI answers a named call


def test_streamed_plan_without_tools_is_plain_content():
    stream = NO_TOOLS.stream()
    deltas = stream.push("a <tool_call>\n") + stream.push("b ") + stream.finish()
    assert "".join(d["content"] for d in deltas) == "a <tool_call>\nb "
    assert stream.output() == ToolOutput("a <tool_call>\nb ", [])


# ------------------------------------------------------------------------------- grammar

@pytest.fixture(scope="module")
def compiler(smollm):
    return GrammarCompiler(smollm.tokenizer, smollm.config.vocab_size)


def accepts(compiler, tokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar, compiled as a request's would be, takes `text` whole."""
    matcher = compiler.matcher(SamplingParams(grammar=grammar))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if matcher.validate_tokens(ids) != len(ids):
        return False
    matcher.consume_tokens(ids)
    return matcher.is_accepting()


def test_required_grammar_ties_each_name_to_its_arguments(compiler, smollm):
    def ok(grammar, text):
        return accepts(compiler, smollm.tokenizer, grammar, text)

    parallel = plan_tools(TOOLS, "required").grammar
    single = plan_tools(TOOLS, "required", False).grammar
    for grammar in (parallel, single):
        assert ok(grammar, PARIS) and ok(grammar, CET)
        assert ok(grammar, call("ping", {}))
        assert ok(grammar, call("get_weather", {"city": "Rome", "unit": "fahrenheit"}))
        assert not ok(grammar, "")  # a call is required
        assert not ok(grammar, "Sure! " + PARIS)
        assert not ok(grammar, call("get_wether", {"city": "Paris", "unit": "celsius"}))
        assert not ok(grammar, call("get_time", {"city": "Paris", "unit": "celsius"}))
        assert not ok(grammar, call("get_weather", {"timezone": "CET"}))
        assert not ok(grammar, call("get_weather", {"city": "Paris"}))  # unit is required
        assert not ok(grammar, call("get_weather", {"city": "Paris", "unit": "kelvin"}))
        assert not ok(grammar, call("get_weather", {"city": 3, "unit": "celsius"}))
        assert not ok(grammar, call("get_time", {"timezone": "CET", "extra": 1}))
        assert not ok(grammar, call("ping", {"x": 1}))
        assert not ok(grammar, PARIS.replace(", ", ",", 1))  # the format's own spacing
    assert ok(parallel, PARIS + "\n" + CET) and ok(parallel, CET + "\n" + CET)
    assert not ok(single, PARIS + "\n" + CET)
    assert HermesToolParser.parse(PARIS + "\n" + CET).tool_calls[1].name == "get_time"


def test_named_grammar_allows_that_function_only(compiler, smollm):
    grammar = plan_tools(TOOLS, NAMED_TIME).grammar
    assert accepts(compiler, smollm.tokenizer, grammar, CET)
    assert not accepts(compiler, smollm.tokenizer, grammar, PARIS)
    assert not accepts(compiler, smollm.tokenizer, grammar, CET + "\n" + CET)


def test_llama3_grammar(compiler, smollm):
    grammar = plan_tools(TOOLS, "required", None, Llama3JsonToolParser).grammar
    one = json.dumps({"name": "get_time", "parameters": {"timezone": "CET"}})
    two = json.dumps({"name": "ping", "parameters": {}})
    assert accepts(compiler, smollm.tokenizer, grammar, one)
    assert accepts(compiler, smollm.tokenizer, grammar, f"{one}; {two}")
    assert not accepts(compiler, smollm.tokenizer, grammar, one.replace('"CET"', "1"))
    assert not accepts(compiler, smollm.tokenizer, grammar, one.replace('"timezone"', '"tz"'))
    calls = Llama3JsonToolParser.parse(f"{one}; {two}").tool_calls
    assert [c.name for c in calls] == ["get_time", "ping"]


# ------------------------------------------------------------------------------- model

@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "get_time"}),
                                           (NAMED_TIME, {"get_time"})])
def test_forced_calls_from_the_model_parse_and_validate(smollm, choice, names):
    """SmolLM2 (whose template has no tools: the default format) forced to call: its output
    parses to one call, streamed or not, whose arguments are valid under the schema."""
    plan = plan_tools([WEATHER, TIME], choice, False)
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    ids = smollm.tokenizer.apply_chat_template(messages, tools=plan.tools, tokenize=True)
    params = SamplingParams(max_tokens=64, temperature=0, grammar=plan.grammar)
    text = smollm.generate([ids], params)[0].text
    out = plan.parse(text)
    assert out.content is None and len(out.tool_calls) == 1, text
    name = out.tool_calls[0].name
    assert name in names
    schema = next(t for t in TOOLS if t["function"]["name"] == name)["function"]["parameters"]
    jsonschema.validate(json.loads(out.tool_calls[0].arguments), schema)
    stream = plan.stream()
    deltas = [d for delta in smollm.stream([ids], params) for d in stream.push(delta.text)]
    deltas += stream.finish()
    assert [(c.name, c.arguments) for c in stream.tool_calls] == [
        (c.name, c.arguments) for c in out.tool_calls]
    assert [d["tool_calls"][0]["index"] for d in deltas] == [0, 0]
    assert plan.finish_reason("stop", out) == ("tool_calls" if choice == "required"
                                               else "stop")
