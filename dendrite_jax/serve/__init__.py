"""OpenAI-compatible HTTP serving: `python -m dendrite_jax.serve`, or `create_app(llm)` for any
ASGI server."""

from dendrite_jax.serve.app import create_app

__all__ = ["create_app"]
