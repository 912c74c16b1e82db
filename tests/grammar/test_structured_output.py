"""Structured output on the real SmolLM2: JSON schemas, regexes, Lark grammars and choices, in
one continuously batched run mixed with unconstrained requests, greedy and sampled."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import jsonschema
import pytest

from dendrite_jax import SamplingParams
from dendrite_jax.engine.request import Request
from tests.grammar.schemas import SCHEMAS
from tests.helpers import SMOLLM

MAX_TOKENS = 120


def chat(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def mixed_run(smollm):
    """Every schema greedy and sampled, plus unconstrained requests, in one generate call."""
    prompts, params = [], []
    for i, schema in enumerate(SCHEMAS):
        prompt = chat(smollm, f"Answer in JSON. Give an example of: {json.dumps(schema)[:200]}")
        prompts += [prompt, prompt]
        params += [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=schema),
                   SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95,
                                  seed=i, json_schema=json.dumps(schema))]
    free = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    prompts += free
    params += [SamplingParams(max_tokens=12, temperature=0)] * len(free)
    return smollm.generate(prompts, params), len(SCHEMAS) * 2


def test_every_schema_gives_valid_json_greedy_and_sampled(mixed_run):
    outputs, constrained = mixed_run
    assert len(SCHEMAS) >= 30
    for k, out in enumerate(outputs[:constrained]):
        schema = SCHEMAS[k // 2]
        assert out.finish_reason == "stop", (schema, out.text, out.finish_reason)
        jsonschema.validate(json.loads(out.text), schema)


def test_unconstrained_requests_in_the_same_batch_are_unaffected(smollm, mixed_run):
    outputs, constrained = mixed_run
    free = outputs[constrained:]
    alone = smollm.generate([o.prompt for o in free], SamplingParams(max_tokens=12, temperature=0))
    assert [o.token_ids for o in free] == [o.token_ids for o in alone]


def test_regex_lark_and_choice(smollm):
    prompt = chat(smollm, "Give me a phone number, a color and a yes/no answer.")
    lark = '''
start: "color: " COLOR ", size: " SIZE
COLOR: "red" | "green" | "blue"
SIZE: /[1-9][0-9]?/
'''
    params = [
        SamplingParams(max_tokens=30, temperature=0, regex=r"\(\d{3}\) \d{3}-\d{4}"),
        SamplingParams(max_tokens=30, temperature=1.0, seed=3, regex=r"[a-z]{2,6}( [a-z]{2,6}){2}"),
        SamplingParams(max_tokens=30, temperature=0, grammar=lark),
        SamplingParams(max_tokens=30, temperature=1.0, seed=4, grammar=lark),
        SamplingParams(max_tokens=30, temperature=0, choice=["yes", "no", "it depends"]),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, choice=["alpha", "beta"]),
    ]
    out = smollm.generate([prompt] * len(params), params)
    assert all(o.finish_reason == "stop" for o in out), [(o.text, o.finish_reason) for o in out]
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out[0].text)
    assert re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){2}", out[1].text)
    for o in out[2:4]:
        assert re.fullmatch(r"color: (red|green|blue), size: [1-9][0-9]?", o.text), o.text
    assert out[4].text in ("yes", "no", "it depends")
    assert out[5].text in ("alpha", "beta")


@pytest.mark.parametrize("bad", [
    dict(json_schema={"type": "object", "properties": {"a": {"type": "wat"}}}),
    dict(json_schema="{not json"),
    dict(regex="(unclosed"),
    dict(grammar="start: undefined_rule"),
])
def test_invalid_constraint_fails_only_that_request(smollm, bad):
    prompts = ["The capital of France is"] * 3
    params = [SamplingParams(max_tokens=6, temperature=0),
              SamplingParams(max_tokens=6, temperature=0, **bad),
              SamplingParams(max_tokens=6, temperature=0, regex="[0-9]{4}")]
    pool_before = smollm.stats().pool.used
    out = smollm.generate(prompts, params)
    assert out[1].finish_reason == "error" and out[1].token_ids == []
    name = next(iter(bad))
    assert out[1].error.startswith(f"invalid {name}") or "json_schema" in out[1].error
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 6
    assert out[2].finish_reason == "stop" and re.fullmatch("[0-9]{4}", out[2].text)
    assert smollm.stats().pool.used == pool_before  # nothing leaked


def test_constraint_arguments_are_validated():
    with pytest.raises(ValueError, match="at most one of json_schema, regex, grammar, choice"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        SamplingParams(choice=[])
    with pytest.raises(ValueError, match="json_schema must be a dict or a JSON string"):
        SamplingParams(json_schema=3)


def test_constraint_needs_a_tokenizer():
    from dendrite_jax import LLM

    llm = LLM(model="tiny-random", max_num_seqs=2, max_num_batched_tokens=32, max_model_len=64)
    with pytest.raises(ValueError, match="structured output needs the model's tokenizer"):
        llm.generate([[1, 2, 3]], SamplingParams(regex="[0-9]"))


def test_online_request_with_a_bad_constraint_is_reported_by_the_next_step(smollm):
    engine = smollm.engine
    good = smollm.add_request("The capital of France is", SamplingParams(max_tokens=4,
                                                                         temperature=0))
    bad = smollm.add_request("Hello", SamplingParams(max_tokens=4, regex="(unclosed"))
    first = engine.step()
    failed = [r for r in first if r.request_id == bad]
    assert failed and failed[0].output().finish_reason == "error"
    assert "invalid regex" in failed[0].output().error
    # While a constrained request runs, each step first applies the one in flight: a failure
    # queued meanwhile is still reported.
    digits = smollm.add_request("Count:", SamplingParams(max_tokens=12, regex="[0-9]{8}"))
    engine.step()
    engine.step()
    late = smollm.add_request("Hello", SamplingParams(max_tokens=4, grammar="start: nowhere"))
    reported = [r for r in engine.step() if r.request_id == late]
    assert reported and reported[0].output().finish_reason == "error"
    done = set()
    while engine.has_unfinished():
        done |= {r.request_id for r in engine.step() if r.finished}
    assert {good, digits} <= done and smollm.stats().pool.used == 0


@pytest.mark.parametrize("forced_tokens,device_automata",
                         [(False, False), (True, False), (False, True)])
def test_preemption_and_aborts_keep_constraints_aligned(forced_tokens, device_automata):
    """A pool too small for the batch forces preemption (constrained requests are recomputed
    with their matchers, or automaton cursors, intact) and one constrained request is aborted
    mid-run: every other output still satisfies its own constraint, and no page leaks; with
    forced tokens too, and with the schemas on device automata."""
    from dendrite_jax import LLM

    llm = LLM(**SMOLLM, max_num_seqs=6, num_pages=14, page_size=16, compilation_cache=False,
              forced_tokens=forced_tokens, device_automata=device_automata)
    prompt = chat(llm, "Give an example of a small JSON object.")
    schemas = [SCHEMAS[1], SCHEMAS[7], SCHEMAS[15], SCHEMAS[23]]
    ids = [llm.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=i,
                                                  json_schema=s))
           for i, s in enumerate(schemas)]
    victim = llm.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8,
                                                    seed=9, json_schema=SCHEMAS[15]))
    free = [llm.add_request(f"Story number {i}:", SamplingParams(max_tokens=40, temperature=0,
                                                                 ignore_eos=True))
            for i in range(2)]
    engine, outputs = llm.engine, {}
    for step in range(10_000):
        if not engine.has_unfinished():
            break
        if step == 6:
            assert llm.abort(victim)
        for r in engine.step():
            if r.finished:
                outputs[r.request_id] = r.output()
    assert llm.stats().preemptions > 0
    assert not llm.engine.structured.automaton_reasons  # with automata, every schema ran on the device
    for rid, schema in zip(ids, schemas, strict=True):
        assert outputs[rid].finish_reason == "stop", outputs[rid].text
        jsonschema.validate(json.loads(outputs[rid].text), schema)
    assert all(len(outputs[rid].token_ids) == 40 for rid in free)
    assert llm.stats().pool.used == 0


def reconfigure(monkeypatch, engine, **changes) -> None:
    """The engine and its components read settings from one changed EngineConfig."""
    cfg = dataclasses.replace(engine.cfg, **changes)
    for holder in (engine, engine.pipeline, engine.structured):
        monkeypatch.setattr(holder, "cfg", cfg)


def test_split_steps_equal_whole_steps(smollm, monkeypatch):
    """While constrained requests decode, each step launches as two executables (forward, then
    sampling once the mask is filled): same tokens as whole steps that wait for the mask,
    whether the launcher makes the calls inline or from its worker thread (as on GPUs)."""
    from dendrite_jax.engine.runner import FORWARD

    prompt = chat(smollm, "Give an example of a small JSON object.")
    requests = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=SCHEMAS[3]),
                SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=4, regex=r"[a-z ]{5,60}"),
                SamplingParams(max_tokens=24, temperature=0.7, seed=2)]
    engine = smollm.engine
    runner = engine.runner
    forwards, threads = [], set()  # split steps launched, threads that launched them
    launch_forward = runner.launch_forward

    def recording(plan):
        forwards.append(plan)
        threads.add(threading.current_thread().name)
        return launch_forward(plan)

    monkeypatch.setattr(runner, "launch_forward", recording)

    def run(split: bool, threaded: bool = False):  # split every step, or none
        reconfigure(monkeypatch, engine, split_constrained_steps=split,
                    threaded_launch=threaded)
        forwards.clear()
        threads.clear()
        outputs = smollm.generate([prompt] * 3, requests)
        assert not engine.has_unfinished() and smollm.stats().pool.used == 0
        return outputs, len(forwards)

    split, split_steps = run(True)
    assert split_steps > 0 and any(kind == FORWARD for _, kind in runner._compiled)
    assert threads == {threading.current_thread().name}
    threaded, threaded_steps = run(True, threaded=True)
    assert threaded_steps == split_steps and threads == {"dendrite-launch_0"}
    whole, split_steps = run(False, threaded=True)
    assert split_steps == 0
    assert [o.token_ids for o in split] == [o.token_ids for o in whole]
    assert [o.token_ids for o in threaded] == [o.token_ids for o in whole]
    assert [o.cumulative_logprob for o in threaded] == [o.cumulative_logprob for o in split]


def test_forced_tokens_give_the_same_outputs_in_fewer_steps(smollm, monkeypatch):
    """`forced_tokens`: tokens a constraint forces are appended without sampling and fed
    several to a row; greedy and seeded sampled outputs are the same tokens as sampling every
    one, in fewer steps; a request asking for logprobs still samples (and scores) each token;
    no page leaks."""
    prompt = chat(smollm, "Give an example of a small JSON object.")
    requests = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, json_schema=s)
                for s in SCHEMAS[:6]]
    requests += [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=i,
                                repetition_penalty=1.1, json_schema=s)
                 for i, s in enumerate(SCHEMAS[6:12])]
    requests += [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1,
                                json_schema=SCHEMAS[3]),
                 SamplingParams(max_tokens=16, temperature=0.7, seed=3)]
    engine, appended = smollm.engine, []
    fast_forward = Request.fast_forward
    monkeypatch.setattr(Request, "fast_forward",
                        lambda r, n: appended.append(fast_forward(r, n)) or appended[-1])

    def run(forced: bool, split: bool | None = None):
        reconfigure(monkeypatch, engine, forced_tokens=forced, split_constrained_steps=split)
        steps = engine.num_steps
        outputs = smollm.generate([prompt] * len(requests), requests)
        return outputs, engine.num_steps - steps

    sampled, sampled_steps = run(False)
    assert not appended
    forwards = []  # split steps launched
    launch_forward = engine.runner.launch_forward
    monkeypatch.setattr(engine.runner, "launch_forward",
                        lambda plan: forwards.append(plan) or launch_forward(plan))
    # split steps (model, then sampling with the mask: how GPUs run them) and whole ones
    for split in (True, False):
        appended.clear()
        forwards.clear()
        forced, forced_steps = run(True, split)
        assert bool(forwards) == split
        # forced runs make mixed steps (multi-token rows), which split as decode steps do
        assert any(not plan.shape.decode_only for plan in forwards) == split
        assert [o.token_ids for o in forced] == [o.token_ids for o in sampled], split
        assert [o.text for o in forced] == [o.text for o in sampled]
        constrained_tokens = sum(len(o.token_ids) for o in forced[:12])
        # 52 of 133 when written; the batch's steps follow its longest output (free text in
        # a JSON string is not forced)
        assert sum(appended) > 0.25 * constrained_tokens and forced_steps <= sampled_steps
    with_logprobs = forced[-2]  # sampled and scored token by token, as without the setting
    assert len(with_logprobs.logprobs) == len(with_logprobs.token_ids)
    assert with_logprobs.cumulative_logprob == pytest.approx(sampled[-2].cumulative_logprob,
                                                             rel=1e-4)
    for out, params in zip(forced[:12], requests[:12], strict=True):
        jsonschema.validate(json.loads(out.text), params.json_schema if isinstance(
            params.json_schema, dict) else json.loads(params.json_schema))
    # best_of ranks completions by cumulative logprob, which forced tokens would not add to:
    # such requests sample every token
    appended.clear()
    ranked = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.8, seed=5, n=1,
                                                    best_of=2, json_schema=SCHEMAS[3]))[0]
    assert len(ranked.samples) == 1 and not any(appended)
    # a constraint that forces its whole output finishes at admission, as sampling would
    whole = SamplingParams(max_tokens=8, temperature=0, grammar='start: "{"')
    at_admission = smollm.generate(prompt, whole)[0]
    assert sum(appended) == 1 and at_admission.text == "{"
    assert at_admission.finish_reason == "stop"
    reconfigure(monkeypatch, engine, forced_tokens=False)
    assert smollm.generate(prompt, whole)[0].token_ids == at_admission.token_ids
    assert smollm.stats().pool.used == 0


def test_device_automata_give_the_same_outputs(smollm):
    """Regexes, choices and JSON schemas stepped on the device (`grammar.device_automaton`, in
    bursts of four) give the tokens llguidance's host matchers give, in a batch mixed with a
    Lark grammar and a schema with number bounds (which keep their matchers) and free rows;
    nothing stays in use."""
    from dendrite_jax import LLM

    prompt = chat(smollm, "Give me a phone number and a color.")
    params = [SamplingParams(max_tokens=24, temperature=0, regex=r"[0-9]{3}-[0-9]{4}"),
              SamplingParams(max_tokens=24, temperature=0, choice=["red", "green", "blue"]),
              SamplingParams(max_tokens=24, temperature=0.8, seed=3,
                             regex=r"[A-Z][a-z]{2,8}( [a-z]{2,8}){2,5}\."),
              SamplingParams(max_tokens=24, temperature=0),
              SamplingParams(max_tokens=24, temperature=0, regex=r"(?s:.)*", ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0, json_schema={
                  "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                  "additionalProperties": False}),
              SamplingParams(max_tokens=24, temperature=0.9, seed=7, json_schema=SCHEMAS[15]),
              SamplingParams(max_tokens=6, temperature=0, grammar='start: "yes" | "no" | NUM\n'
                                                                   'NUM: /[0-9]+/'),
              SamplingParams(max_tokens=6, temperature=0, json_schema={
                  "type": "number", "minimum": 0, "maximum": 10}),
              SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=5,
                             regex=r'\{"name":"[a-z]{1,8}","count":[0-9]{1,2}\}')]
    expected = smollm.generate([prompt] * len(params), params)
    llm = LLM(**SMOLLM, max_num_seqs=8, device_automata=True, automaton_states=2048,
              decode_burst=4)
    steps_before, bursts = llm.engine.num_steps, []
    launch = llm.engine.runner.launch
    llm.engine.runner.launch = lambda plan, mask=None: (bursts.append(plan.shape.burst)
                                                        or launch(plan, mask))
    got = llm.generate([prompt] * len(params), params)
    for e, g in zip(expected, got, strict=True):
        assert (g.text, g.token_ids, g.finish_reason, g.error) == (
            e.text, e.token_ids, e.finish_reason, e.error)
        assert g.cumulative_logprob == pytest.approx(e.cumulative_logprob, abs=1e-3)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", got[0].text) and got[1].text in ("red", "green",
                                                                                 "blue")
    assert sorted(llm.engine.structured.automaton_reasons) == [
        "grammar constraints run with llguidance",
        "json_schema: schema keywords ['maximum', 'minimum']"]
    # Once the rows whose matchers (or logit sort) need each token are done, the rest decode
    # in bursts.
    assert 4 in bursts and llm.engine.num_steps - steps_before < 24
    assert llm.engine.stats().pool.used == 0
    assert not llm.engine.has_unfinished()
