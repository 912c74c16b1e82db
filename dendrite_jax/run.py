"""Command line: generate a completion with a model.

    python -m dendrite_jax.run --model=smollm2-135m --prompt="The capital of France is"
    python -m dendrite_jax.run --chat --prompt="Write a haiku about JAX." --temperature=0.7
    python -m dendrite_jax.run --model=Qwen/Qwen3-0.6B --allow_download  # a Hugging Face repo id
    # on each of 2 hosts (i = 0, 1), the model split over both hosts' 8 devices:
    python -m dendrite_jax.run --tensor_parallel_size=8 --coordinator_address=host0:1234 \
        --num_processes=2 --process_id=i

Prints the completion, then tokens/s and time to first token (measured from process start,
so cold and warm runs can be compared). `--profile_dir` writes a jax.profiler trace of the
generation; open it with TensorBoard's profile plugin or xprof. In a multi-host job every
process generates and process 0 prints.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from dendrite_jax.engine_flags import (  # noqa: E402
    define_engine_flags,
    engine_settings,
    join_processes,
    load_options,
)
from dendrite_jax.frontend.prompts import prompt_token_ids  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Preset name, preset .toml, .gguf file, Hugging "
                    "Face checkpoint directory or Hugging Face repo id (org/name).")
flags.DEFINE_string("prompt", "The capital of France is", "Prompt text.")
flags.DEFINE_boolean("chat", False, "Wrap the prompt as a user message in the chat template.")
flags.DEFINE_integer("max_tokens", 64, "Maximum number of tokens to generate.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_integer("top_k", 0, "Top-k sampling; 0 disables.")
flags.DEFINE_float("min_p", 0.0, "Min-p sampling in [0, 1]; 0 disables.")
flags.DEFINE_float("repetition_penalty", 1.0, "Repetition penalty; 1 disables.")
flags.DEFINE_integer("seed", None, "Per-request sampling seed.")
flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of generation here.")
# Every engine setting but the engine's default seed (--seed is this request's) and warm-up
# (a one-shot run compiles just the programs its request runs through).
define_engine_flags(exclude=("seed", "warmup"))


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the output
    from dendrite_jax import LLM, SamplingParams
    from dendrite_jax.parallel.distributed import is_leader

    try:
        join_processes()
        params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                top_p=FLAGS.top_p, top_k=FLAGS.top_k, min_p=FLAGS.min_p,
                                repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed)
        load_start = time.perf_counter()
        llm = LLM(model=FLAGS.model, **load_options(), **engine_settings(warmup=False))
        load_seconds = time.perf_counter() - load_start
        prompt = FLAGS.prompt
        if FLAGS.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        compiles_before = len(llm.engine.runner.compile_log)
        start = time.perf_counter()
        # One request: compile just the programs it runs through, side by side.
        prompt_len = len(prompt_token_ids(llm.model, prompt))
        llm.engine.warmup(llm.engine.planner.shapes_for(prompt_len, params), freeze=False)
        generate_start = time.perf_counter()
        if FLAGS.profile_dir:
            import jax

            with jax.profiler.trace(FLAGS.profile_dir):
                output = llm.generate([prompt], params)[0]
        else:
            output = llm.generate([prompt], params)[0]
        elapsed = time.perf_counter() - start
        new_compiles = llm.engine.runner.compile_log[compiles_before:]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    if not is_leader():  # every process generated the same tokens; one reports
        return 0
    print(output.text)
    n = len(output.token_ids)
    ttft_from_start = (generate_start - _PROCESS_START) + (output.time_to_first_token or 0.0)
    # Decode speed from the first generated token to the last (the programs were compiled
    # before the request).
    compiling = sum(seconds for _, seconds in new_compiles)
    decode = output.decode_time or 0.0
    decode_rate = (n - 1) / decode if n > 1 and decode > 0 else float("nan")
    print(f"[{n} tokens in {elapsed:.2f}s | decode {decode_rate:.1f} tok/s | time to first "
          f"token {ttft_from_start:.2f}s from process start (load {load_seconds:.2f}s, compile "
          f"{generate_start - start:.2f}s, first step {output.time_to_first_token:.2f}s) | "
          f"compiling {compiling:.2f}s over threads for {len(new_compiles)} step programs | "
          f"finish: {output.finish_reason}]", file=sys.stderr)
    if FLAGS.profile_dir:
        print(f"[profile trace written under {FLAGS.profile_dir}]", file=sys.stderr)
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
