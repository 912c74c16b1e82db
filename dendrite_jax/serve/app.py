"""The HTTP application (Starlette): OpenAI-compatible routes over an `AsyncEngine`.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events with
`"stream": true`), GET /v1/models, /health and /metrics. A client that disconnects aborts its
request, which frees its pages; a full queue answers 503; bad requests get a 4xx with
OpenAI's error body naming the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dendrite_jax.engine.llm import LLM
from dendrite_jax.serve import protocol
from dendrite_jax.serve.async_engine import AsyncEngine, Delta, QueueFull
from dendrite_jax.serve.metrics import registry_for, render
from dendrite_jax.serve.protocol import ApiError, Parsed

DISCONNECT_POLL_S = 0.1


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json(request: Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from e


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _collect(deltas: AsyncIterator[Delta], request: Request) -> Delta | None:
    """The final delta (text accumulated), or None if the client went away first."""
    text, tokens = [], []

    async def run() -> Delta:
        async for d in deltas:
            text.append(d.text)
            tokens.extend(d.token_ids)
            if d.finish_reason is not None:
                return Delta("".join(text), tokens, d.finish_reason, d.output)
        raise RuntimeError("the engine ended the request without a final delta")

    task = asyncio.ensure_future(run())
    while not task.done():
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


def create_app(llm: LLM, *, model_name: str | None = None, max_pending: int = 256
               ) -> Starlette:
    """An app serving `llm`; its engine thread starts now and stops with the app."""
    engine = AsyncEngine(llm, max_pending=max_pending)
    name = model_name or llm.config.name
    registry = registry_for(engine)
    max_model_len = llm.engine.max_model_len
    created = int(time.time())

    async def admit(parsed: Parsed):
        try:
            return await engine.submit(parsed.prompt, parsed.prompt_ids, parsed.params)
        except QueueFull as e:
            raise ApiError(503, str(e), kind="server_error", code="queue_full") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        except RuntimeError as e:  # the engine has stopped (/health says why)
            raise ApiError(503, str(e), kind="server_error", code="engine_stopped") from e

    def endpoint(parse: Callable, full_body: Callable, chunk: Callable, prefix: str,
                 chat: bool):
        async def handle(request: Request) -> Response:
            try:
                parsed = parse(await _json(request), llm.tokenizer, name, max_model_len)
                request_id, deltas = await admit(parsed)
            except ApiError as e:
                return _error(e)
            rid = protocol.new_id(prefix)
            if not parsed.stream:
                final = await _collect(deltas, request)
                if final is None:
                    engine.abort(request_id)
                    return Response(status_code=499)
                if final.finish_reason == "error":
                    message = final.output.error if final.output else "the engine failed"
                    return _error(ApiError(500, message, kind="server_error"))
                return JSONResponse(full_body(rid, parsed.model, final.text,
                                              final.finish_reason, len(parsed.prompt_ids),
                                              len(final.token_ids)))

            async def events() -> AsyncIterator[bytes]:
                finished = False
                try:
                    if chat:
                        yield _sse(chunk(rid, parsed.model, {"role": "assistant",
                                                             "content": ""}, None))
                    async for d in deltas:
                        if d.finish_reason == "error":
                            message = d.output.error if d.output else "the engine failed"
                            yield _sse(ApiError(500, message, kind="server_error").body())
                            finished = True
                            break
                        content = {"content": d.text} if chat else d.text
                        if d.text or d.finish_reason is not None:
                            yield _sse(chunk(rid, parsed.model, content, d.finish_reason))
                        finished = d.finish_reason is not None
                    yield _sse("[DONE]")
                finally:
                    if not finished:  # the client went away: free the request's pages
                        engine.abort(request_id)

            return StreamingResponse(events(), media_type="text/event-stream")

        return handle

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "dendrite-jax",
             "max_model_len": max_model_len}]})

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

    app = Starlette(routes=[
        Route("/v1/completions", endpoint(protocol.parse_completion, protocol.completion_body,
                                          protocol.completion_chunk, "cmpl", False),
              methods=["POST"]),
        Route("/v1/chat/completions", endpoint(protocol.parse_chat, protocol.chat_body,
                                               protocol.chat_chunk, "chatcmpl", True),
              methods=["POST"]),
        Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics),
    ], lifespan=lifespan)
    app.state.engine = engine
    return app
