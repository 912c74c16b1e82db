"""Tool calling over HTTP through the official `openai` client, on the real SmolLM2: each
`tool_choice` streamed and whole (forced calls always parse and validate against their schema;
streamed and whole answers agree), a two-turn conversation with the call and a `role: tool`
result sent back, content given as text parts, and refusals naming their field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from dendrite_jax.serve import create_app
from tests.serve.live_server import uvicorn_server

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                   "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def client(smollm):
    with uvicorn_server(create_app(smollm)) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), base


def ask(client, stream=False, **kw):
    args = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=48, temperature=0,
                parallel_tool_calls=False, **kw)
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments)
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(**args, stream=True):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, [None, "", ""])
            if call.id:
                entry[0] = call.id
            entry[1] += call.function.name or ""
            entry[2] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def valid(calls, names) -> bool:
    for _, name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return bool(calls)


@pytest.mark.parametrize("choice, names, finish", [
    ("required", {"get_weather", "get_time"}, "tool_calls"),
    (NAMED, {"get_time"}, "stop"),
])
def test_forced_calls_parse_and_validate_streamed_and_whole(client, choice, names, finish):
    whole = ask(client[0], tool_choice=choice)
    streamed = ask(client[0], stream=True, tool_choice=choice)
    assert whole[0] is None and valid(whole[1], names) and len(whole[1]) == 1
    assert whole[2] == finish == streamed[2]
    # call ids are fresh per answer; names and arguments agree
    assert [c[1:] for c in streamed[1]] == [c[1:] for c in whole[1]]
    assert all(c[0].startswith("call_") for c in whole[1] + streamed[1])


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_auto_and_none_answer_with_content(client, choice):
    whole = ask(client[0], tool_choice=choice)
    streamed = ask(client[0], stream=True, tool_choice=choice)
    assert whole == streamed  # this small model answers in prose: no call to read
    assert whole[0] and whole[1] == [] and whole[2] == "length"


def test_a_two_turn_conversation_with_the_tool_result(client):
    (call_id, name, arguments), = ask(client[0], tool_choice="required")[1]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id,
         "content": json.dumps({"temperature": 18, "unit": "celsius"})}]
    answer = client[0].chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                               max_tokens=24, temperature=0)
    assert answer.choices[0].message.content
    # the result reached the prompt: the same history without it renders a different prompt
    base = client[1]
    with_result = httpx.post(base + "/tokenize", json={"messages": history, "tools": TOOLS})
    without = httpx.post(base + "/tokenize", json={"messages": history[:-1]})
    assert with_result.status_code == without.status_code == 200
    assert with_result.json()["count"] > without.json()["count"]


def test_text_parts_and_developer_role_are_read(client):
    parts = [{"role": "developer", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "text", "text": "Name a"},
                                          {"type": "text", "text": "fruit."}]}]
    joined = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "Name a\nfruit."}]
    args = dict(model=MODEL, max_tokens=6, temperature=0)
    assert (client[0].chat.completions.create(messages=parts, **args).choices[0].message.content
            == client[0].chat.completions.create(messages=joined, **args
                                                 ).choices[0].message.content)


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"messages": [{"role": "tool", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400_naming_the_field(client, body, param):
    response = httpx.post(client[1] + "/v1/chat/completions",
                          json={"model": MODEL, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
