"""Beam search on the engine's paged cache, scored as Hugging Face transformers does.

Each running beam holds its own page list; a child beam shares its parent's pages by
reference count (`PagePool.fork`) and a page is copied only when a beam writes into a page it
shares (the prompt's last page, on the beams' first step). Per step the device returns each
beam's top `MAX_LOGPROBS` log-probabilities, which contain every candidate that can enter the
global top 2 x width (so width <= MAX_LOGPROBS / 2).

Scoring follows transformers' `generate(num_beams=w, do_sample=False)`: the 2w best
continuations of all beams by summed log-probability; a continuation that ends (an EOS token,
or the length limit) joins the finished hypotheses if it is among the first w, with score
sum_logprobs / generated_length ** length_penalty; the w best unfinished ones continue.
`early_stopping=True` stops when w hypotheses are finished; False stops when the best running
beam, scored at its current length, cannot beat the worst finished hypothesis; "never" scores
it at the maximum length when length_penalty > 0. Outputs are the finished hypotheses, best
first.

A constraint (json_schema, regex, grammar or choice, as in `SamplingParams`) applies per beam:
each beam owns an llguidance matcher, a child beam takes its parent's (the last child) or a
copy of it (the others) and advances it by its token, and each step's mask keeps every beam's
candidates among the tokens its own matcher allows (EOS only where the constraint is
complete). Scores stay the model's unmasked log-probabilities, as a transformers logits
processor that sets disallowed tokens to -inf leaves them.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from dendrite_jax.engine.runner import to_host
from dendrite_jax.engine.sampling import MAX_LOGPROBS
from dendrite_jax.engine.step_output import StepResult
from dendrite_jax.grammar.constraint import CONSTRAINTS, check_constraint
from dendrite_jax.search.tree import TreeState
from dendrite_jax.validation import is_finite_real, is_int

DEAD = -1.0e9  # transformers' score for "not a candidate"


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    json_schema: dict | str | None = None  # at most one constraint, as in SamplingParams
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    @property
    def constrained(self) -> bool:
        return any(getattr(self, n) is not None for n in CONSTRAINTS)

    def __post_init__(self) -> None:
        if not (is_int(self.beam_width) and 1 <= self.beam_width <= MAX_LOGPROBS // 2):
            raise ValueError(f"beam_width must be an integer in [1, {MAX_LOGPROBS // 2}], got "
                             f"{self.beam_width!r}")
        if not (is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_finite_real(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got "
                             f"{self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got "
                             f"{self.early_stopping!r}")
        check_constraint(self)


@dataclasses.dataclass(frozen=True)
class BeamSequence:
    token_ids: list[int]  # generated tokens (an ending EOS included, as transformers returns)
    text: str | None
    score: float  # sum of log-probabilities / generated length ** length_penalty


@dataclasses.dataclass(frozen=True)
class BeamSearchOutput:
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]  # best first
    max_pages_in_use: int  # the most KV pages this prompt's beams held at once


@dataclasses.dataclass
class _Beam:
    prompt_len: int
    node: int  # generated tokens so far, a `TreeState` handle (-1: none yet); the last
    # one is this step's input
    length: int  # generated tokens
    pages: list[int]
    score: float
    last: int = -1  # the last generated token (this step's input)
    matcher: object | None = None  # llguidance matcher at this beam's tokens (constrained)


class _Search:
    """The state of one prompt's search (transformers' per-batch-item bookkeeping)."""

    def __init__(self, prompt: list[int], params: BeamSearchParams, eos: set[int]) -> None:
        self.prompt, self.params, self.eos = prompt, params, eos
        self.width = params.beam_width
        self.max_length = len(prompt) + params.max_tokens
        self.cur_len = len(prompt)
        self.running: list[_Beam] = []
        self.tree = TreeState()  # beams' and hypotheses' tokens share their prefixes
        self.finished: list[tuple[float, int]] = []  # (score, tree handle), best first, <= width
        self.improvable = True
        self.done = False
        self.max_pages = 0

    def step(self, candidates: list[tuple[float, int, int]]) -> list[tuple[int, int, float]]:
        """Take (summed logprob, parent index, token) candidates, best first; return the next
        running beams as (parent index, token, score)."""
        w, k = self.width, 2 * self.width
        top = candidates[:k]
        generated = self.cur_len + 1 - len(self.prompt)
        hits = [tok in self.eos or self.cur_len + 1 >= self.max_length for _, _, tok in top]
        # Finished hypotheses: only among the first w candidates.
        full = len(self.finished) == w and self.params.early_stopping is True
        new = []
        if self.improvable and not full:
            for i, ((acc, parent, tok), hit) in enumerate(zip(top, hits, strict=True)):
                if i < w and hit:
                    new.append((acc / generated ** self.params.length_penalty,
                                self.child(self.running[parent].node, tok)))
        ranked = sorted(self.finished + new, key=lambda h: -h[0])
        for _, handle in ranked[w:]:
            self.tree.release(handle)
        self.finished = ranked[:w]
        # Running beams: the w best candidates that did not end.
        alive = [(acc + (DEAD if hit else 0.0), parent, tok)
                 for (acc, parent, tok), hit in zip(top, hits, strict=True)]
        alive.sort(key=lambda c: -c[0])
        nxt = [(parent, tok, acc) for acc, parent, tok in alive[:w]]
        self.cur_len += 1
        self._update_improvable([acc for _, _, acc in nxt])
        all_finished = len(self.finished) == w
        self.done = (not self.improvable or (all_finished and self.params.early_stopping is True)
                     or all(hits))
        return nxt

    def child(self, node: int, token: int) -> int:
        """A handle on the tokens of `node` (-1: none) followed by `token`."""
        return self.tree.sequence([token]) if node < 0 else self.tree.append(node, token)

    def _update_improvable(self, running_scores: list[float]) -> None:
        lp = self.params.length_penalty
        if self.params.early_stopping == "never" and lp > 0:
            length = self.max_length - len(self.prompt)
        else:
            length = self.cur_len - len(self.prompt)
        best = running_scores[0] / length ** lp
        if len(self.finished) == self.width:
            self.improvable = self.improvable and best > min(s for s, _ in self.finished)


def _candidates(beams: list[_Beam], result: StepResult, rows: list[int]) -> list[tuple]:
    """(summed logprob, beam index, token) of every beam's top tokens, best first."""
    out = []
    for b, (beam, row) in enumerate(zip(beams, rows, strict=True)):
        if beam.score <= DEAD / 2:
            continue  # an ended beam kept as filler: its candidates never reach the top
        for lp, tok in zip(result.top_logprobs[row], result.top_ids[row], strict=True):
            if np.isfinite(lp):  # -inf: fewer tokens than the list's length are allowed
                out.append((beam.score + float(lp), b, int(tok)))
    out.sort(key=lambda c: -c[0])  # stable: ties keep beam-major order, as a flat top-k does
    return out


def beam_search(engine, prompts: list[list[int]], params: BeamSearchParams
                ) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids) on an idle engine; prompts run together while
    their beams fit `max_num_seqs` rows."""
    if engine.has_unfinished():
        raise RuntimeError("beam_search needs an idle engine: other requests are in flight")
    width = params.beam_width
    if engine.cfg.kv_full_precision_window:  # a forked beam's tail is in its parent's slot
        raise ValueError("beam_search does not combine with a KV cache's full-precision tail "
                         "yet: build the LLM with kv_full_precision_window=0")
    if width > engine.cfg.max_num_seqs:
        raise ValueError(f"beam_width {width} exceeds max_num_seqs {engine.cfg.max_num_seqs}")
    eos = set(engine.model.tokenizer.stop_token_ids) if engine.model.tokenizer else set()
    for p in prompts:
        if len(p) + params.max_tokens > engine.max_model_len:
            raise ValueError(f"prompt of {len(p)} tokens + max_tokens {params.max_tokens} exceeds "
                             f"max_model_len {engine.max_model_len}")
    # The constraint compiles once (one that llguidance rejects raises GrammarError, a
    # ValueError, before anything runs); each prompt's first beam starts from a copy.
    matcher = engine.structured.compiler().matcher(params) if params.constrained else None
    group = max(1, engine.cfg.max_num_seqs // width)
    outputs = []
    for start in range(0, len(prompts), group):
        outputs += _run_group(engine, prompts[start:start + group], params, eos, matcher)
    return outputs


def _run_group(engine, prompts: list[list[int]], params: BeamSearchParams, eos: set[int],
               matcher) -> list[BeamSearchOutput]:
    blocks, page_size = engine.blocks, engine.cfg.page_size
    searches = [_Search(p, params, eos) for p in prompts]
    try:
        # Prefill each prompt once; its last position's logprobs seed the beams.
        for s in searches:
            root = _Beam(len(s.prompt), -1, 0,
                         blocks.allocate(math.ceil(len(s.prompt) / page_size)), 0.0,
                         matcher=None if matcher is None else matcher.deep_copy())
            s.running = [root]
            s.max_pages = len(root.pages)
            result = _prefill(engine, s.prompt, root.pages, root.matcher)
            _advance(s, blocks, _candidates([root], result, [0]))
            blocks.release(root.pages)
        while not all(s.done for s in searches):
            live = [s for s in searches if not s.done]
            beams = [b for s in live for b in s.running]
            _grow_pages(engine, beams)
            for s in live:
                s.max_pages = max(s.max_pages, len({p for b in s.running for p in b.pages}))
            result = _run(engine, [([b.last], b.prompt_len + b.length - 1, b.pages, b.prompt_len)
                                   for b in beams], [b.matcher for b in beams])
            row = 0
            for s in live:
                n = len(s.running)
                old = s.running
                _advance(s, blocks, _candidates(old, result, list(range(row, row + n))))
                for b in old:
                    blocks.release(b.pages)
                row += n
    finally:
        for s in searches:
            for b in s.running:
                blocks.release(b.pages)
            s.running = []
    tokenizer = engine.model.tokenizer
    return [BeamSearchOutput(
        prompt_token_ids=s.prompt, max_pages_in_use=s.max_pages,
        sequences=[BeamSequence(t, tokenizer.decode(t) if tokenizer else None, score)
                   for score, t in ((score, s.tree.tokens(h)) for score, h in s.finished)])
        for s in searches]


def _advance(s: _Search, blocks, candidates: list[tuple]) -> None:
    """One search step: the next running beams fork their parents' pages."""
    parents = s.running
    nxt = s.step(candidates)
    s.running = [_Beam(len(s.prompt), s.child(parents[p].node, tok), parents[p].length + 1,
                       blocks.fork(parents[p].pages), score, tok) for p, tok, score in nxt]
    for b in parents:
        if b.node >= 0:
            s.tree.release(b.node)
    _fork_matchers(parents, s.running, nxt)


def _fork_matchers(parents: list[_Beam], children: list[_Beam], nxt: list[tuple]) -> None:
    """Each live child's matcher: its parent's advanced by the child's token (the parent's own
    object for the last child, copies for the others). Filler beams (ended) get none."""
    by_parent = collections.defaultdict(list)
    for child, (p, _, score) in zip(children, nxt, strict=True):
        if parents[p].matcher is not None and score > DEAD / 2:
            by_parent[p].append(child)
    for p, kids in by_parent.items():
        for i, child in enumerate(kids):
            matcher = parents[p].matcher if i == len(kids) - 1 else parents[p].matcher.deep_copy()
            if not matcher.consume_token(child.last):
                raise RuntimeError(f"constraint rejected token {child.last} that its mask "
                                   f"allowed: {matcher.get_error()}")
            child.matcher = matcher


def _grow_pages(engine, beams: list[_Beam]) -> None:
    """Each beam writes its input token at position prompt + generated - 1: give it a page for
    it, copying a page it shares with another beam before writing into it."""
    blocks, page_size = engine.blocks, engine.cfg.page_size
    copies = []
    for b in beams:
        index = (b.prompt_len + b.length - 1) // page_size
        if index == len(b.pages):
            b.pages.extend(blocks.allocate(1))
        elif (copy := blocks.writable(b.pages, index)) is not None:
            copies.append(copy)
    engine.runner.copy_pages([s for s, _ in copies], [d for _, d in copies])


def _prefill(engine, prompt: list[int], pages: list[int], matcher) -> StepResult:
    """Compute the prompt's K/V in chunks of the token budget; the last chunk's result (row 0)
    holds the logprobs after the prompt (among the tokens `matcher` allows, if any)."""
    budget = engine.cfg.max_num_batched_tokens
    for start in range(0, len(prompt), budget):
        result = _run(engine, [(prompt[start:start + budget], start, pages, len(prompt))],
                      [matcher])
    return result


def _run(engine, rows: list[tuple[list[int], int, list[int], int]],
         matchers: list) -> StepResult:
    """One synchronous step over rows of (input tokens, position of the first, pages, prompt
    length), each reading back its top logprobs among the tokens its matcher (None:
    unconstrained) allows."""
    pages_for = engine.blocks.pages_for
    shape = engine.planner.builder.shape([len(tokens) for tokens, *_ in rows], needs_sort=True)
    page_tables = np.zeros((len(rows), shape.pages_per_seq), np.int32)
    for row, (tokens, start, pages, _) in enumerate(rows):
        width = pages_for(start + len(tokens))
        page_tables[row, :width] = pages[:width]
    plan = engine.planner.builder.build(
        shape, [tokens for tokens, *_ in rows], page_tables,
        dict(seq_lens=[start + len(tokens) for tokens, start, *_ in rows],
             slot_ids=range(len(rows)),  # the engine is idle: every slot is free
             prompt_lens=[prompt_len for *_, prompt_len in rows],
             sample=[1] * len(rows), reset=[1] * len(rows)))
    constrained = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
    mask = engine.structured.grammar.mask(shape.num_seqs, constrained) if constrained else None
    out = engine.runner.launch(plan, mask)
    (result,) = to_host(shape, out)
    return result
