"""Streaming deltas: joined, a request's deltas are its final output (text, tokens, logprobs),
for random token texts, stop strings, launches ahead and delta times; and on the real SmolLM2,
`LLM.stream` agrees with `LLM.generate`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax import SamplingParams
from dendrite_jax.frontend.streaming import StreamPosition, held_back, next_delta
from tests.frontend.fakes import MAX_LEN, NO_TOP, FakeEngine, PieceTokenizer

ALPHABET = "ab, "  # few letters: stop strings often match, across token boundaries too


@st.composite
def runs(draw):
    """(pieces, params, tokens, logprobs, launched ahead before each token, delta after it)."""
    pieces = draw(st.lists(st.text(ALPHABET, max_size=3), min_size=1, max_size=6))
    tokens = draw(st.lists(st.integers(0, len(pieces) - 1), min_size=1, max_size=30))
    stop = draw(st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=2))
    text = "".join(pieces[t] for t in tokens)
    if len(text) > 1 and draw(st.booleans()):  # a piece of the text: often across tokens
        start = draw(st.integers(0, len(text) - 2))
        stop.append(text[start:start + draw(st.integers(2, 4))])
    params = SamplingParams(max_tokens=len(tokens), stop=stop,
                            include_stop_str_in_output=draw(st.booleans()),
                            logprobs=draw(st.sampled_from([None, 0])))
    steps = len(tokens)
    logprobs = draw(st.lists(st.floats(-10, 0), min_size=steps, max_size=steps))
    ahead = draw(st.lists(st.integers(0, 2), min_size=steps, max_size=steps))
    emit = draw(st.lists(st.booleans(), min_size=steps, max_size=steps))
    return pieces, params, tokens, logprobs, ahead, emit


@settings(max_examples=400, deadline=None)
@given(run=runs())
def test_deltas_joined_are_the_output(run):
    pieces, params, tokens, logprobs, ahead, emit = run
    request = FakeEngine(PieceTokenizer(pieces)).make_request(None, [0], params)
    position, deltas = StreamPosition(), []
    for token, logprob, launches, now in zip(tokens, logprobs, ahead, emit, strict=True):
        if request.finished:
            break
        while request.num_pending < launches and len(request.output_ids) < params.max_tokens:
            request.add_pending()  # a launch whose token is read back later
        request.append_token(token, MAX_LEN, logprob, 1, NO_TOP, NO_TOP)
        if now:
            deltas.append(next_delta(request, position, 3))
            # what has streamed is a prefix of the text, and the position counts it
            streamed = "".join(d.text for d in deltas if d is not None)
            assert request.text.startswith(streamed) and position.text == len(streamed)
    assert request.finished  # by a stop string or max_tokens
    deltas.append(next_delta(request, position, 3))
    assert next_delta(request, position, 3) is None  # one last delta, once
    deltas = [d for d in deltas if d is not None]
    out = request.output()
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    if params.logprobs is None:
        assert all(d.logprobs is None for d in deltas)
    else:
        assert [lp for d in deltas for lp in d.logprobs] == out.logprobs
    assert all(d.index == 3 and d.request_id == request.request_id for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert all(d.output is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == out.finish_reason and deltas[-1].output == out


def test_text_shorter_than_what_is_held_back_streams_nothing_yet():
    """With a 4-character stop string, 3 characters wait; a shorter text waits whole."""
    request = FakeEngine(PieceTokenizer(["a", "b", "c"])).make_request(
        None, [0], SamplingParams(max_tokens=8, stop=["zzzz"]))
    position = StreamPosition()
    request.append_token(0, MAX_LEN, 0.0, 1, NO_TOP, NO_TOP)
    first = next_delta(request, position)
    assert (first.text, first.token_ids, position.text) == ("", [0], 0)
    for token in (1, 2, 0, 1):
        request.append_token(token, MAX_LEN, 0.0, 1, NO_TOP, NO_TOP)
    assert next_delta(request, position).text == "ab"  # "abcab": all but the last 3


def test_text_a_stop_string_may_still_cut_is_held_back():
    assert held_back(SamplingParams()) == 0
    assert held_back(SamplingParams(stop=["ab", "abcd"])) == 3
    assert held_back(SamplingParams(stop=["abcd"], include_stop_str_in_output=True)) == 0


PROMPT = "Count from one to ten in words: one, two, three,"


def test_stream_agrees_with_generate(smollm):
    """A stop string of two tokens (its first already generated when the second arrives),
    logprobs, and n = 2 completions told apart by index."""
    greedy = SamplingParams(max_tokens=20, temperature=0, stop=", six", logprobs=2)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=5, n=2, logprobs=1)
    outputs = smollm.generate([PROMPT, PROMPT], [greedy, sampled])
    assert outputs[0].stop_reason == ", six" and outputs[0].text.endswith("five")
    deltas = list(smollm.stream([PROMPT, PROMPT], [greedy, sampled]))
    by_request = {}
    for d in deltas:
        by_request.setdefault(int(d.request_id), []).append(d)
    streamed = [by_request[r] for r in sorted(by_request)]
    assert [parts[0].index for parts in streamed] == [0, 0, 1]
    for parts, expected in zip(streamed, [outputs[0], *outputs[1].samples], strict=True):
        out = parts[-1].output
        assert "".join(d.text for d in parts) == out.text == expected.text
        assert [t for d in parts for t in d.token_ids] == out.token_ids == expected.token_ids
        assert [lp for d in parts for lp in d.logprobs] == out.logprobs
        assert parts[-1].finish_reason == expected.finish_reason
        assert all(d.finish_reason is None for d in parts[:-1])
    assert smollm.stats().pool.used == 0
