"""`python -m dendrite_jax.serve --model=smollm2-135m [--host] [--port] [--api_key]`: an
OpenAI-compatible HTTP server (uvicorn) over one LLM. The API key may come from the environment
(`DENDRITE_API_KEY`), which keeps it out of the process list."""

from __future__ import annotations

import os

from absl import app, flags, logging

from dendrite_jax.engine_flags import fp8_fold_norms, fp8_keep_layers, llm_kwargs
from dendrite_jax.serve.app import DEFAULT_TEMPLATE_TIMEOUT_S
from dendrite_jax.serve.guard import DEFAULT_MAX_BODY_BYTES, default_allowed_hosts

API_KEY_ENV = "DENDRITE_API_KEY"

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model preset, GGUF file or Hugging Face dir.")
flags.DEFINE_string("served_model_name", None, "The name clients pass as 'model' "
                    "(default: the model's name).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("max_num_seqs", 16, "Requests decoded together.")
flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens per step (prefill chunking).")
flags.DEFINE_integer("max_model_len", None, "Context limit; defaults to the model's.")
flags.DEFINE_integer("max_pending", 256, "Requests admitted at once; more get 503.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1 routes "
                    "(default: $DENDRITE_API_KEY; none: anyone who can connect may generate).")
flags.DEFINE_list("allowed_hosts", None, "Host header names answered, '*' for any (default: "
                  "localhost, 127.0.0.1 and ::1 when --host is a loopback address, else any).")
flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, "Largest request body; larger "
                     "ones get 413 before they are read whole.")
flags.DEFINE_float("template_timeout_s", DEFAULT_TEMPLATE_TIMEOUT_S, "Time limit on rendering "
                   "a chat template; longer renders get 422.")
flags.DEFINE_bool("enable_prefix_caching", True, "Share KV pages of common prompt prefixes.")
flags.DEFINE_enum("attention_backend", "auto", ["auto", "reference", "pallas_gpu", "pallas_tpu"],
                  "Paged attention backend.")
flags.DEFINE_string("kv_compression", "none", "KV cache compression (see --helpfull of run).")
flags.DEFINE_enum("weights_dtype", None, ["fp8", "mxfp8", "fp8-channel"],
                  "Store the layers' projections as FP8.")
flags.DEFINE_integer("tensor_parallel_size", 1, "Devices the model is split over.")
flags.DEFINE_bool("warmup", True, "Compile every step program before serving (in parallel, "
                  "read from the persistent compilation cache on a second start); a new "
                  "program while serving is then an error.")


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.num_processes > 1:
        raise app.UsageError("the server runs on one host: multi-host serving would need every "
                             "request sent to every process, which it does not do yet; use "
                             "--tensor_parallel_size over one host's devices")
    import uvicorn

    from dendrite_jax import LLM
    from dendrite_jax.serve.app import create_app

    llm = LLM(model=FLAGS.model, **llm_kwargs(
        dtype=FLAGS.dtype, max_num_seqs=FLAGS.max_num_seqs,
        max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_model_len=FLAGS.max_model_len,
        enable_prefix_caching=FLAGS.enable_prefix_caching,
        attention_backend=FLAGS.attention_backend, kv_compression=FLAGS.kv_compression,
        weights_dtype=FLAGS.weights_dtype, fp8_keep_layers=fp8_keep_layers(),
        fp8_fold_norms=fp8_fold_norms(),
        tensor_parallel_size=FLAGS.tensor_parallel_size, warmup=FLAGS.warmup))
    api_key = FLAGS.api_key or os.environ.get(API_KEY_ENV) or None
    allowed_hosts = FLAGS.allowed_hosts or default_allowed_hosts(FLAGS.host)
    application = create_app(llm, model_name=FLAGS.served_model_name,
                             max_pending=FLAGS.max_pending, api_key=api_key,
                             allowed_hosts=allowed_hosts, max_body_bytes=FLAGS.max_body_bytes,
                             template_timeout_s=FLAGS.template_timeout_s)
    if api_key is None and "*" in allowed_hosts:
        logging.warning("serving with no API key to any host: anyone who can reach %s:%d can "
                        "generate (set --api_key or $%s)", FLAGS.host, FLAGS.port, API_KEY_ENV)
    logging.info("serving %s on http://%s:%d/v1", FLAGS.served_model_name or llm.config.name,
                 FLAGS.host, FLAGS.port)
    uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="info")


if __name__ == "__main__":
    app.run(main)
