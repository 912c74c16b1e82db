"""The HTTP application (Starlette): OpenAI-compatible routes over an `AsyncEngine`.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`"stream": true`; `protocol` parses, `answers` answers in `responses`' shapes), POST
/tokenize and /detokenize (vLLM's), GET /v1/models, /version, /health and /metrics. A client
that disconnects aborts its request, which frees its pages; a full queue answers 503; bad
requests get a 4xx with OpenAI's error body naming the problem, and so does a request that fails
on its own (a constraint that breaks mid-generation, a chat template that fails). `Guard`
refuses bad hosts, keys, content types and oversized bodies first. The event loop only moves
bytes: decoding JSON, tokenising and rendering chat templates run on a small thread pool, a
template's render has a time limit, and grammars compile on the engine thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dendrite_jax.frontend.llm import LLM
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve import protocol, tokenization
from dendrite_jax.serve.answers import Answer, collect, request_error
from dendrite_jax.serve.async_engine import AsyncEngine, QueueFull
from dendrite_jax.serve.guard import DEFAULT_MAX_BODY_BYTES, Guard
from dendrite_jax.serve.metrics import registry_for, render
from dendrite_jax.serve.protocol import ApiError, Parsed
from dendrite_jax.serve.responses import ChatShapes, CompletionShapes, new_id
from dendrite_jax.serve.tool_parsers import parser_for_template

DEFAULT_TEMPLATE_TIMEOUT_S = 5.0
PARSE_THREADS = 4  # decode, tokenise and render requests off the event loop
RENDER_THREADS = 2  # chat templates; a render past its time limit keeps its thread until done

VERSION = importlib.metadata.version("dendrite-jax")

log = logging.getLogger(__name__)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _failure(e: Exception) -> JSONResponse:
    """A request's ApiError as it is; anything else is a server fault (500, logged)."""
    if isinstance(e, ApiError):
        return _error(e)
    log.exception("request failed")
    return _error(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405, in OpenAI's error body."""
    return _error(ApiError(exc.status_code, exc.detail, headers=exc.headers))


def _timed_render(pool: concurrent.futures.Executor, timeout_s: float,
                  tokenizer: Tokenizer, messages: list[dict],
                  tools: list[dict] | None = None) -> list[int]:
    """`protocol.render_chat` on `pool`, waited for at most `timeout_s` (from a parse thread,
    never the event loop). A render past it is answered 422 and its thread runs on until the
    render ends: a sandboxed template's loops are bounded by the (size-limited) body."""
    future = pool.submit(protocol.render_chat, tokenizer, messages, tools)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError as e:
        future.cancel()  # still queued behind other renders: never starts
        raise ApiError(422, f"the chat template did not render these messages within "
                       f"{timeout_s:g} s", "messages", code="template_timeout") from e


def create_app(llm: LLM, *, model_name: str | None = None, max_pending: int = 256,
               api_key: str | None = None, allowed_hosts: Iterable[str] = ("*",),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               template_timeout_s: float = DEFAULT_TEMPLATE_TIMEOUT_S) -> Starlette:
    """An app serving `llm`; its engine thread starts now and stops with the app. `api_key`:
    required as `Authorization: Bearer` on /v1 routes; `allowed_hosts`: the Host names
    answered ("*" any, "*.example.com" a domain's); `max_body_bytes`: larger bodies get 413;
    `template_timeout_s`: a chat template rendering longer gets 422."""
    engine = AsyncEngine(llm, max_pending=max_pending)
    name = model_name or llm.config.name
    registry = registry_for(engine, name)
    max_model_len = llm.engine.max_model_len
    created = int(time.time())
    tokenizer = llm.tokenizer

    @functools.lru_cache(maxsize=65536)
    def decode_token(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    max_prompt_chars = protocol.prompt_char_limit(tokenizer, max_model_len)
    parse_pool = concurrent.futures.ThreadPoolExecutor(PARSE_THREADS, "dendrite-parse")
    render_pool = concurrent.futures.ThreadPoolExecutor(RENDER_THREADS, "dendrite-render")
    render_chat = functools.partial(_timed_render, render_pool, template_timeout_s)
    tool_parser = parser_for_template(tokenizer.chat_template)

    def parse_request(parse: Callable, raw: bytes) -> Parsed:
        """On a parse thread: the request's bytes to a `Parsed` request."""
        body = protocol.decode_body(raw)
        kwargs = ({"render": render_chat, "tool_parser": tool_parser}
                  if parse is protocol.parse_chat else {})
        return parse(body, tokenizer, name, max_model_len, max_prompt_chars, **kwargs)

    async def admit(parsed: Parsed):
        try:
            return await engine.submit(parsed.prompt, parsed.prompt_ids, parsed.params)
        except QueueFull as e:
            raise ApiError(503, str(e), kind="server_error", code="queue_full") from e
        except ValueError as e:
            raise ApiError(400, str(e), parsed.param_for(e)) from e
        except RuntimeError as e:  # the engine has stopped (/health says why)
            raise ApiError(503, str(e), kind="server_error", code="engine_stopped") from e

    def endpoint(parse: Callable, shapes_for: Callable, prefix: str, chat: bool):
        async def handle(request: Request) -> Response:
            try:
                raw = await request.body()  # at most max_body_bytes (Guard)
                parsed = await asyncio.get_running_loop().run_in_executor(
                    parse_pool, parse_request, parse, raw)
                request_id, deltas = await admit(parsed)
            except Exception as e:  # noqa: BLE001 - every failure answered in OpenAI's shape
                return _failure(e)
            answer = Answer(parsed, shapes_for(parsed.model, parsed.logprobs, decode_token),
                            new_id(prefix), tokenizer)
            if not parsed.stream:
                finals = await collect(deltas, request, parsed.params.n)
                if finals is None:
                    engine.abort(request_id)
                    return Response(status_code=499)
                failed = next((d for d in finals if d.finish_reason == "error"), None)
                if failed is not None:
                    return _error(request_error(failed, parsed))
                return JSONResponse(answer.whole(finals))

            async def events() -> AsyncIterator[bytes]:
                ended = False
                try:
                    async for event in answer.stream(deltas, chat):
                        yield event
                    ended = True
                finally:
                    if not ended:  # the client went away: free the request's pages
                        engine.abort(request_id)

            return StreamingResponse(events(), media_type="text/event-stream")

        return handle

    def utility(answer: Callable[[Any], dict]):
        """A POST route answering JSON computed off the event loop (tokenising)."""
        async def handle(request: Request) -> Response:
            try:
                raw = await request.body()
                return JSONResponse(await asyncio.get_running_loop().run_in_executor(
                    parse_pool, lambda: answer(protocol.decode_body(raw))))
            except Exception as e:  # noqa: BLE001 - every failure answered in OpenAI's shape
                return _failure(e)

        return handle

    vocab_size = llm.config.vocab_size
    tokenize = utility(lambda body: tokenization.tokenize(
        body, tokenizer, name, max_model_len, max_prompt_chars, render_chat))
    detokenize = utility(lambda body: tokenization.detokenize(body, tokenizer, name,
                                                              vocab_size))

    async def version(request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "dendrite-jax",
             "root": llm.config.name, "parent": None, "max_model_len": max_model_len}]})

    async def health(request: Request) -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()
        parse_pool.shutdown(wait=False, cancel_futures=True)
        render_pool.shutdown(wait=False, cancel_futures=True)

    app = Starlette(routes=[
        Route("/v1/completions", endpoint(protocol.parse_completion, CompletionShapes, "cmpl",
                                          False), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(protocol.parse_chat, ChatShapes, "chatcmpl",
                                               True), methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/models", models), Route("/version", version), Route("/health", health),
        Route("/metrics", metrics),
    ], lifespan=lifespan, exception_handlers={HTTPException: _http_error}, middleware=[Middleware(
        Guard, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)])
    app.state.engine = engine
    return app
