"""The HTTP application (Starlette): OpenAI-compatible routes over an `AsyncEngine`.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`"stream": true`; `n` choices, logprobs, echo: `protocol` parses, `responses` shapes), POST
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
import json
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
from dendrite_jax.frontend.streaming import CompletionDelta
from dendrite_jax.model.tokenizer import Tokenizer
from dendrite_jax.serve import protocol, tokenization
from dendrite_jax.serve.async_engine import AsyncEngine, QueueFull
from dendrite_jax.serve.guard import DEFAULT_MAX_BODY_BYTES, Guard
from dendrite_jax.serve.metrics import registry_for, render
from dendrite_jax.serve.protocol import ApiError, Parsed
from dendrite_jax.serve.responses import (
    ChatShapes,
    ChoiceState,
    CompletionShapes,
    Piece,
    assistant_message,
    new_id,
    tool_chunks,
)
from dendrite_jax.serve.tool_parsers import parser_for_template

DISCONNECT_POLL_S = 0.1
DEFAULT_TEMPLATE_TIMEOUT_S = 5.0
PARSE_THREADS = 4  # decode, tokenise and render requests off the event loop
RENDER_THREADS = 2  # chat templates; a render past its time limit keeps its thread until done

VERSION = importlib.metadata.version("dendrite-jax")

log = logging.getLogger(__name__)


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405, in OpenAI's error body."""
    return _error(ApiError(exc.status_code, exc.detail, headers=exc.headers))


def _failed(final: CompletionDelta, parsed: Parsed) -> ApiError:
    """The error ending a request: its own failure (a constraint that broke mid-generation) is
    a 400 naming the constraint's field; no output means the engine thread died (500)."""
    if final.output is None or not final.output.error:
        return ApiError(500, "the engine stopped while running this request (see /health)",
                        kind="server_error", code="engine_stopped")
    return ApiError(400, final.output.error, parsed.constraint_field, code="request_failed")


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


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _collect(deltas: AsyncIterator[CompletionDelta], request: Request,
                   completions: int) -> list[CompletionDelta] | None:
    """Each completion's last delta, by index, or None if the client went away first."""
    async def run() -> list[CompletionDelta]:
        finals: dict[int, CompletionDelta] = {}
        async for d in deltas:
            if d.finish_reason is not None:
                finals[d.index] = d
        if len(finals) != completions:
            raise RuntimeError("the engine ended a request without its final delta")
        return [finals[i] for i in range(completions)]

    task = asyncio.ensure_future(run())
    while not task.done():
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


def _prompt_piece(parsed: Parsed, tokenizer: Tokenizer,
                  prompt_logprobs: list | None) -> Piece:
    """The prompt as an echoed completion shows it before its generated text."""
    text = parsed.prompt if parsed.prompt is not None else tokenizer.decode(
        parsed.prompt_ids, skip_special_tokens=False)
    logprobs = None if parsed.logprobs is None else list(prompt_logprobs or [None])
    return Piece(text, list(parsed.prompt_ids), logprobs)


def _shown(parsed: Parsed, generated: Piece) -> Piece:
    """What a completion shows of its generated piece: nothing where echo with max_tokens 0
    generated one token only to score the prompt."""
    if parsed.echo_only:
        return Piece("", [], None if parsed.logprobs is None else [])
    return generated


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
            except ApiError as e:
                return _error(e)
            except Exception as e:  # noqa: BLE001 - a server fault, answered in OpenAI's shape
                log.exception("request failed")
                return _error(ApiError(500, f"internal error: {type(e).__name__}",
                                       kind="server_error"))
            rid = new_id(prefix)
            shapes = shapes_for(parsed.model, parsed.logprobs, decode_token)
            n = parsed.params.n
            if not parsed.stream:
                finals = await _collect(deltas, request, n)
                if finals is None:
                    engine.abort(request_id)
                    return Response(status_code=499)
                failed = next((d for d in finals if d.finish_reason == "error"), None)
                if failed is not None:
                    return _error(_failed(failed, parsed))
                choices, generated = [], 0
                for i, d in enumerate(finals):
                    out = d.output
                    piece = _shown(parsed, Piece(out.text, out.token_ids, out.logprobs))
                    if parsed.echo:
                        piece = _prompt_piece(parsed, tokenizer, out.prompt_logprobs) + piece
                    generated += 0 if parsed.echo_only else len(out.token_ids)
                    if parsed.tools.parser is None:
                        choices.append(shapes.choice(i, piece, d.finish_reason, ChoiceState()))
                        continue
                    calls = parsed.tools.parse(out.text)
                    choices.append(shapes.choice(
                        i, piece, parsed.tools.finish_reason(d.finish_reason, calls),
                        ChoiceState(), message=assistant_message(calls)))
                return JSONResponse(shapes.body(rid, choices, len(parsed.prompt_ids), generated))

            async def events() -> AsyncIterator[bytes]:
                finished = False
                states = [ChoiceState() for _ in range(n)]
                calls = ([parsed.tools.stream() for _ in range(n)]
                         if parsed.tools.parser is not None else None)
                try:
                    if chat:
                        for i in range(n):
                            yield _sse(shapes.role_chunk(rid, i))
                    async for d in deltas:
                        if d.finish_reason == "error":
                            yield _sse(_failed(d, parsed).body())
                            finished = True
                            break
                        state = states[d.index]
                        piece = _shown(parsed, Piece(d.text, d.token_ids, d.logprobs))
                        if parsed.echo and not state.started:
                            piece = _prompt_piece(parsed, tokenizer, d.prompt_logprobs) + piece
                        state.started = True
                        state.tokens += len(d.token_ids)
                        if calls is not None:
                            for chunk in tool_chunks(shapes, rid, d, piece, state,
                                                     calls[d.index], parsed.tools):
                                yield _sse(chunk)
                        elif (piece.text or d.finish_reason is not None
                                or (piece.token_ids and parsed.logprobs is not None)):
                            yield _sse(shapes.chunk(rid, [shapes.chunk_choice(
                                d.index, piece, d.finish_reason, state)]))
                    else:
                        finished = True
                        if parsed.include_usage:
                            generated = 0 if parsed.echo_only else sum(s.tokens for s in states)
                            yield _sse(shapes.usage_chunk(rid, len(parsed.prompt_ids),
                                                          generated))
                    yield _sse("[DONE]")
                finally:
                    if not finished:  # the client went away: free the request's pages
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
            except ApiError as e:
                return _error(e)
            except Exception as e:  # noqa: BLE001 - a server fault, answered in OpenAI's shape
                log.exception("request failed")
                return _error(ApiError(500, f"internal error: {type(e).__name__}",
                                       kind="server_error"))

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
