"""`python -m dendrite_jax.serve --model=smollm2-135m [--host] [--port] [--api_key]`: an
OpenAI-compatible HTTP server (uvicorn) over one LLM (`dendrite serve MODEL` is the same with
vLLM's flag spellings: `dendrite_jax.cli`). The API key may come from the environment
(`DENDRITE_API_KEY`), which keeps it out of the process list."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from dendrite_jax.engine_flags import define_engine_flags, engine_settings, load_options
from dendrite_jax.serve.app import DEFAULT_TEMPLATE_TIMEOUT_S
from dendrite_jax.serve.guard import DEFAULT_MAX_BODY_BYTES, default_allowed_hosts

API_KEY_ENV = "DENDRITE_API_KEY"

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Preset name, preset .toml, .gguf file, Hugging "
                    "Face checkpoint directory or Hugging Face repo id (org/name).")
flags.DEFINE_string("served_model_name", None, "The name clients pass as 'model' "
                    "(default: the model's name).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_integer("max_pending", 256, "Requests admitted at once; more get 503.")
flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer <key>' on /v1 routes "
                    "(default: $DENDRITE_API_KEY; none: anyone who can connect may generate).")
flags.DEFINE_list("allowed_hosts", None, "Host header names answered, '*' for any (default: "
                  "localhost, 127.0.0.1 and ::1 when --host is a loopback address, else any).")
flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES, "Largest request body; larger "
                     "ones get 413 before they are read whole.")
flags.DEFINE_float("template_timeout_s", DEFAULT_TEMPLATE_TIMEOUT_S, "Time limit on rendering "
                   "a chat template; longer renders get 422.")
# The engine settings, with a server's defaults where they differ from LLM's: more requests
# decoded together, prompt prefixes shared, every step program compiled before serving.
SERVER_DEFAULTS = dict(max_num_seqs=16, enable_prefix_caching=True, warmup=True)
define_engine_flags(SERVER_DEFAULTS)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.num_processes > 1:
        raise app.UsageError("the server runs on one host: multi-host serving would need every "
                             "request sent to every process, which it does not do yet; use "
                             "--tensor_parallel_size over one host's devices")
    import uvicorn

    from dendrite_jax import LLM
    from dendrite_jax.serve.app import create_app

    try:
        llm = LLM(model=FLAGS.model, **load_options(), **engine_settings())
    except ValueError as e:  # a model that cannot be found or read, a bad setting
        sys.exit(f"error: {e}")
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
