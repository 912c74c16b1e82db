"""Serving benchmarks: decode throughput, prefill latency, host overhead per step, the host
cost of admitting a request, a shared system prompt with and without prefix caching, and a
mixed stream (requests of random prompt and output lengths and sampling settings, arriving
together, so prefill chunks and decode rows share steps).

    python benchmarks/serving.py                                     # SmolLM2 on CPU
    python benchmarks/serving.py --workloads=mixed                   # one workload
    python benchmarks/serving.py --model=llama-3.2-1b --dtype=bfloat16 --batch=64 \\
        --shared_prefix=4096 --shared_requests=64 --transformers      # on a GPU

With --transformers set XLA_PYTHON_CLIENT_MEM_FRACTION (say 0.5) so that JAX's preallocation
leaves PyTorch room for its batch-64 prefill.

Prints a table and writes JSON. With --transformers (a CUDA GPU and a random-weight preset),
Hugging Face transformers `generate` with a static, compiled cache runs the decode and
shared-prefix workloads in the same process for a ratio.

Each timed workload also records the tokens its steps computed against the tokens they
scheduled (`computed_over_scheduled`: a step computes its bucket's `num_tokens`, padding
included, for `q_lens.sum()` real ones; a decode burst counts each of its steps; also split
into mixed steps, which carry prefill chunks, and decode-only ones), read from every plan the
runner launches, and the runner's compilations before and after it and during it
(`compiles_during`: with `--warmup=on` anything but 0 is a shape warm-up missed, which the
runner refuses with RecompileError).
"""

from __future__ import annotations

import contextlib
import statistics
import time
import weakref

import numpy as np
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
SHARED_NEW_TOKENS = 8
flags.DEFINE_string("model", "smollm2-135m", "Model preset or path.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("batch", 8, "Concurrent requests for decode throughput (max_num_seqs).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request for decode throughput.")
flags.DEFINE_integer("max_tokens", 64, "New tokens per request for decode throughput.")
flags.DEFINE_list("prefill_lens", ["512", "2048"], "Prompt lengths for prefill latency.")
flags.DEFINE_integer("shared_prefix", 1024, "System-prompt tokens shared by every request.")
flags.DEFINE_integer("shared_requests", 16, "Requests sharing the system prompt.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Token budget per step.")
flags.DEFINE_float("kv_cache_gb", 1.0, "KV cache size in GiB.")
flags.DEFINE_list("workloads", ["decode", "prefill", "add_request", "shared_prefix", "mixed"],
                  "Workloads to run.")
flags.DEFINE_integer("mixed_requests", 32, "Requests in the mixed workload.")
flags.DEFINE_integer("mixed_max_prompt", 1024, "Longest prompt of the mixed workload (each "
                     "is uniform between 16 and this).")
flags.DEFINE_integer("mixed_max_tokens", 128, "Most new tokens per mixed-workload request "
                     "(each is uniform between 8 and this).")
flags.DEFINE_boolean("transformers", False, "Also run Hugging Face transformers (CUDA).")
flags.DEFINE_enum("warmup", "off", ["on", "off", "auto"], "LLM(warmup=...): compile every step "
                  "shape up front (on; a new shape then raises), on demand (off), or the "
                  "platform's default (auto).")
flags.DEFINE_string("output", "benchmarks/results/serving_cpu.json", "JSON output path.")


def token_prompts(n: int, length: int, vocab: int, salt: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(salt)
    return [[int(t) for t in rng.integers(3, min(vocab, 30000), length)] for _ in range(n)]


TOKEN_KEYS = ("computed_tokens", "scheduled_tokens", "launches", "mixed_computed_tokens",
              "mixed_scheduled_tokens")
RUN_TOTALS = dict.fromkeys(TOKEN_KEYS, 0)  # the timed workloads'
ALL_LAUNCHES = dict.fromkeys(TOKEN_KEYS, 0)  # every launched step, untimed ones included


class TokenCounter:
    """Tokens the runner's launched steps compute (their bucket's `num_tokens`) and schedule
    (`q_lens.sum()`), each times the steps of a burst; read from the plans `launch` and
    `launch_forward` receive (a split step's `launch_sample` reads the same plan again)."""

    def __init__(self, runner) -> None:
        self.totals = dict.fromkeys(TOKEN_KEYS, 0)
        for name in ("launch", "launch_forward"):
            setattr(runner, name, self._counting(getattr(runner, name)))

    def _counting(self, launch):
        def counted(plan, *args, **kwargs):
            burst = plan.shape.burst
            computed, scheduled = plan.shape.num_tokens * burst, int(plan.q_lens.sum()) * burst
            mixed = not plan.shape.decode_only
            step = {"computed_tokens": computed, "scheduled_tokens": scheduled, "launches": 1,
                    "mixed_computed_tokens": computed * mixed,
                    "mixed_scheduled_tokens": scheduled * mixed}
            for totals in (self.totals, ALL_LAUNCHES):
                for key, value in step.items():
                    totals[key] += value
            return launch(plan, *args, **kwargs)
        return counted


COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LLM -> its TokenCounter


def token_ratio(totals: dict, kind: str = "") -> float | None:
    """Computed over scheduled tokens of every step (`kind` ""), or of mixed steps ("mixed_")."""
    scheduled = totals[f"{kind}scheduled_tokens"]
    return totals[f"{kind}computed_tokens"] / scheduled if scheduled else None


def with_ratios(totals: dict) -> dict:
    return {**totals, "computed_over_scheduled": token_ratio(totals),
            "mixed_computed_over_scheduled": token_ratio(totals, "mixed_")}


@contextlib.contextmanager
def measured(llm: LLM, into: dict):
    """Add to `into` the computed and scheduled tokens of the steps launched inside the
    block, and the runner's compilations before, after and during it."""
    runner, counter = llm.engine.runner, COUNTERS[llm]
    compilations, logged = runner.compilations, len(runner.compile_log)
    before = dict(counter.totals)
    yield
    new = runner.compile_log[logged:]
    for key in TOKEN_KEYS:
        value = counter.totals[key] - before[key]
        into[key] = into.get(key, 0) + value
        RUN_TOTALS[key] += value
    into.update(with_ratios(into))
    into.setdefault("compilations_before", compilations)
    into["compilations_after"] = runner.compilations
    into["compiles_during"] = into.get("compiles_during", 0) + len(new)
    into["compile_s_during"] = into.get("compile_s_during", 0.0) + sum(t for _, t in new)


def make_llm(prefix_caching: bool, num_seqs: int, max_model_len: int) -> LLM:
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=num_seqs,
              max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_model_len=max_model_len,
              enable_prefix_caching=prefix_caching,
              warmup={"on": True, "off": False, "auto": None}[FLAGS.warmup],
              kv_cache_bytes=int(FLAGS.kv_cache_gb * 2**30))
    COUNTERS[llm] = TokenCounter(llm.engine.runner)
    return llm


def timed_generate(llm: LLM, prompts, params) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return time.perf_counter() - start, outputs


def decode_throughput(llm: LLM) -> dict:
    prompts = token_prompts(FLAGS.batch, FLAGS.prompt_len, llm.config.vocab_size)
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
    timed_generate(llm, prompts, params)  # warm-up: compiles
    engine = llm.engine
    host0, wait0, steps0 = engine.host_seconds, engine.wait_seconds, engine.num_steps
    launch0 = engine.launch_seconds
    tokens: dict = {}
    with measured(llm, tokens):
        seconds, _ = timed_generate(llm, prompts, params)
    steps = engine.num_steps - steps0
    host, wait = engine.host_seconds - host0, engine.wait_seconds - wait0
    launch = engine.launch_seconds - launch0
    return {"batch": FLAGS.batch, "seconds": seconds,
            "tokens_per_s": FLAGS.batch * FLAGS.max_tokens / seconds,
            "steps": steps, "ms_per_step": 1e3 * seconds / steps,
            "host_ms_per_step": 1e3 * host / steps, "launch_ms_per_step": 1e3 * launch / steps,
            "wait_ms_per_step": 1e3 * wait / steps, **tokens}


def prefill_latency(llm: LLM) -> list[dict]:
    rows = []
    for length in (int(n) for n in FLAGS.prefill_lens):
        prompt = token_prompts(1, length, llm.config.vocab_size, salt=length)
        params = SamplingParams(max_tokens=1, temperature=0)
        timed_generate(llm, prompt, params)  # warm-up
        tokens: dict = {}
        with measured(llm, tokens):
            seconds = min(timed_generate(llm, prompt, params)[0] for _ in range(2))
        rows.append({"prompt_tokens": length, "seconds": seconds,
                     "tokens_per_s": length / seconds, **tokens})
    return rows


def add_request_cost(llm: LLM, n: int = 500) -> dict:
    prompts = token_prompts(n, FLAGS.prompt_len, llm.config.vocab_size, salt=7)
    params = SamplingParams(max_tokens=4)
    start = time.perf_counter()
    ids = [llm.add_request(p, params) for p in prompts]
    seconds = time.perf_counter() - start
    for request_id in ids:
        llm.abort(request_id)
    return {"requests": n, "us_per_request": 1e6 * seconds / n}


def shared_prompts(vocab: int) -> list[list[int]]:
    """One system prompt followed by a distinct 24-token question per request."""
    system = token_prompts(1, FLAGS.shared_prefix, vocab, salt=1)[0]
    return [system + q for q in token_prompts(FLAGS.shared_requests, 24, vocab, salt=2)]


def shared_prefix(prefix_caching: bool, max_model_len: int) -> dict:
    llm = make_llm(prefix_caching, min(FLAGS.shared_requests, 64), max_model_len)
    vocab = llm.config.vocab_size
    prompts = shared_prompts(vocab)
    params = SamplingParams(max_tokens=SHARED_NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(token_prompts(2, 40, vocab, salt=3), params)  # compile small shapes
    computed = sum(len(p) for p in prompts)
    compiles_before = len(llm.engine.runner.compile_log)
    tokens: dict = {}
    with measured(llm, tokens):
        seconds, outputs = timed_generate(llm, prompts, params)
    compiles = llm.engine.runner.compile_log[compiles_before:]
    saved = llm.stats().prefix_cache.tokens_saved if prefix_caching else 0
    ttft = [o.time_to_first_token for o in outputs]
    return {"prefix_caching": prefix_caching, "requests": len(prompts),
            "prefill_tokens_computed": computed - saved, "tokens_saved": saved,
            "seconds": seconds, "ttft_mean_s": statistics.mean(ttft),
            "ttft_max_s": max(ttft), "compilations": len(compiles),
            "compile_s": sum(t for _, t in compiles), **tokens,
            "tokens": [o.token_ids for o in outputs]}


def mixed_stream(llm: LLM) -> dict:
    """Requests of random prompt lengths, output lengths and sampling settings (greedy; top-p;
    top-k with logprobs), submitted together."""
    rng = np.random.default_rng(11)
    n, vocab = FLAGS.mixed_requests, llm.config.vocab_size
    lengths = rng.integers(16, FLAGS.mixed_max_prompt + 1, n)
    prompts = [token_prompts(1, int(length), vocab, salt=100 + i)[0]
               for i, length in enumerate(lengths)]
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.95),
             dict(temperature=0.7, top_k=40, logprobs=2)]
    params = [SamplingParams(max_tokens=int(m), ignore_eos=True, seed=i, **kinds[i % 3])
              for i, m in enumerate(rng.integers(8, FLAGS.mixed_max_tokens + 1, n))]
    llm.generate(token_prompts(3, 40, vocab, salt=5), params[:3])  # compile small shapes
    tokens: dict = {}
    with measured(llm, tokens):
        seconds, outputs = timed_generate(llm, prompts, params)
    generated = sum(len(o.token_ids) for o in outputs)
    return {"requests": n, "prompt_tokens": int(lengths.sum()), "generated_tokens": generated,
            "seconds": seconds, "tokens_per_s": (generated + int(lengths.sum())) / seconds,
            "ttft_mean_s": statistics.mean(o.time_to_first_token for o in outputs), **tokens}


def transformers_baseline(max_model_len: int) -> dict:
    """HF generate (static cache, compiled) on the decode and shared-prefix workloads."""
    import torch
    from hf_baseline import generate_seconds, hf_llama

    model = hf_llama(FLAGS.model, max_model_len)
    vocab = model.config.vocab_size
    decode = generate_seconds(model, token_prompts(FLAGS.batch, FLAGS.prompt_len, vocab),
                              FLAGS.max_tokens)
    prompts = shared_prompts(vocab)
    first_token = generate_seconds(model, prompts, 1, warmups=1)
    shared = generate_seconds(model, prompts, SHARED_NEW_TOKENS, warmups=1)
    del model
    torch.cuda.empty_cache()
    return {"decode": {"batch": FLAGS.batch, "seconds": decode,
                       "tokens_per_s": FLAGS.batch * FLAGS.max_tokens / decode},
            "shared_prefix": {"requests": len(prompts),
                              "prefill_tokens_computed": sum(map(len, prompts)),
                              "seconds": shared, "ttft_s": first_token}}


WORKLOADS = ("decode", "prefill", "add_request", "shared_prefix", "mixed")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    unknown = set(FLAGS.workloads) - set(WORKLOADS)
    if unknown:
        raise app.UsageError(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    run = set(FLAGS.workloads)
    longest = max([FLAGS.prompt_len + FLAGS.max_tokens, FLAGS.shared_prefix + 64,
                   FLAGS.mixed_max_prompt + FLAGS.mixed_max_tokens,
                   *(int(n) + 8 for n in FLAGS.prefill_lens)])
    max_model_len = 1 << (longest - 1).bit_length()
    report = header("serving", model=FLAGS.model, dtype=FLAGS.dtype, warmup=FLAGS.warmup,
                    workloads=sorted(run))
    timed: list[tuple[str, dict]] = []  # (name, row) of each timed workload
    if run & {"decode", "prefill", "add_request", "mixed"}:
        llm = make_llm(False, FLAGS.batch, max_model_len)
        if "decode" in run:
            report["decode_throughput"] = decode_throughput(llm)
            timed.append(("decode_throughput", report["decode_throughput"]))
        if "prefill" in run:
            report["prefill_latency"] = prefill_latency(llm)
            timed += [(f"prefill_latency {r['prompt_tokens']}", r)
                      for r in report["prefill_latency"]]
        if "add_request" in run:
            report["add_request"] = add_request_cost(llm)
        if "mixed" in run:
            report["mixed"] = mixed_stream(llm)
            timed.append(("mixed", report["mixed"]))
        del llm
    if "shared_prefix" in run:
        without = shared_prefix(False, max_model_len)
        with_cache = shared_prefix(True, max_model_len)
        same = without.pop("tokens") == with_cache.pop("tokens")
        report["shared_prefix"] = {"system_prompt_tokens": FLAGS.shared_prefix,
                                   "without_cache": without, "with_cache": with_cache,
                                   "same_greedy_tokens": same}
        timed += [("shared_prefix cache off", without), ("shared_prefix cache on", with_cache)]
    report["token_efficiency"] = {**with_ratios(RUN_TOTALS),
                                  "all_launches": with_ratios(ALL_LAUNCHES)}
    if FLAGS.transformers and "decode" in run and "shared_prefix" in run:
        try:
            report["transformers"] = transformers_baseline(max_model_len)
        except Exception as e:  # reported, not hidden: the JSON says why there is no ratio
            report["transformers"] = {"error": f"{type(e).__name__}: {e}"}

    print(f"\nserving, {FLAGS.model} {FLAGS.dtype} on {report['device']}")
    if "decode" in run:
        d = report["decode_throughput"]
        print(f"decode_throughput  batch {d['batch']}: {d['tokens_per_s']:.1f} tok/s, "
              f"{d['ms_per_step']:.2f} ms/step")
        print(f"mixed_step_overhead  host {d['host_ms_per_step']:.2f} ms/step (of which launch "
              f"{d['launch_ms_per_step']:.2f}), blocked reading results "
              f"{d['wait_ms_per_step']:.2f} ms/step")
    for row in report.get("prefill_latency", []):
        print(f"prefill_latency  {row['prompt_tokens']} tokens: {row['seconds'] * 1e3:.1f} ms "
              f"({row['tokens_per_s']:.0f} tok/s)")
    if "add_request" in run:
        print(f"add_request  {report['add_request']['us_per_request']:.1f} us per request")
    if "mixed" in run:
        m = report["mixed"]
        print(f"mixed  {m['requests']} requests, {m['prompt_tokens']} prompt + "
              f"{m['generated_tokens']} generated tokens in {m['seconds']:.2f} s "
              f"({m['tokens_per_s']:.0f} tok/s), TTFT mean {m['ttft_mean_s']:.3f} s")
    if "shared_prefix" in run:
        print(f"shared_prefix  {FLAGS.shared_prefix}-token system prompt x "
              f"{FLAGS.shared_requests}:")
        for row in (without, with_cache):
            print(f"  cache {'on ' if row['prefix_caching'] else 'off'}: "
                  f"{row['prefill_tokens_computed']:>7} prefill tokens, {row['seconds']:.2f} s, "
                  f"TTFT mean {row['ttft_mean_s']:.3f} s max {row['ttft_max_s']:.3f} s "
                  f"(includes {row['compilations']} compilations, {row['compile_s']:.2f} s)")
        print(f"  same greedy tokens: {same}")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    print("computed / scheduled tokens (all steps; mixed steps), and compilations during each "
          "timed workload (before -> after):")
    for name, row in timed:
        print(f"  {name:26} {row['computed_tokens']:>8} / {row['scheduled_tokens']:<8} = "
              f"{ratio(row['computed_over_scheduled'])}; mixed "
              f"{ratio(row['mixed_computed_over_scheduled'])}   compiles "
              f"{row['compiles_during']} ({row['compilations_before']} -> "
              f"{row['compilations_after']})")
    e = report["token_efficiency"]
    for name, row in [("all timed workloads", e), ("every launched step", e["all_launches"])]:
        print(f"  {name:26} {row['computed_tokens']:>8} / {row['scheduled_tokens']:<8} = "
              f"{ratio(row['computed_over_scheduled'])}; mixed "
              f"{ratio(row['mixed_computed_over_scheduled'])}")
    if FLAGS.warmup == "on":
        missed = sum(row["compiles_during"] for _, row in timed)
        print(f"  warm-up on: {missed} compilations during timed workloads (expected 0)")
    if "transformers" in report:
        t = report["transformers"]
        if "error" in t:
            print(f"transformers baseline failed: {t['error']}")
        else:
            d = report["decode_throughput"]
            td, ts = t["decode"], t["shared_prefix"]
            td["ours_over_transformers"] = d["tokens_per_s"] / td["tokens_per_s"]
            ts["ours_cache_on_ttft_over_transformers"] = with_cache["ttft_mean_s"] / ts["ttft_s"]
            print(f"transformers decode batch {td['batch']}: {td['tokens_per_s']:.1f} tok/s; "
                  f"ours/transformers {td['ours_over_transformers']:.2f}")
            print(f"transformers shared_prefix: {ts['prefill_tokens_computed']} prefill tokens, "
                  f"{ts['seconds']:.2f} s, TTFT {ts['ttft_s']:.3f} s (one batch; ours with "
                  f"cache: mean TTFT {with_cache['ttft_mean_s']:.3f} s)")
    out = write(report, FLAGS.output)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
