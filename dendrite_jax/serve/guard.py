"""The server's front door: an ASGI middleware that refuses a request before any route sees it.

In order: a `Host` header outside the allow list (400; a DNS-rebinding page cannot reach a
server on localhost), a /v1 request without the API key (401), a POST whose body is not JSON
(415; a browser sends text/plain or form bodies cross-site without asking first), and a body
over the size limit (413), checked from Content-Length and again while the body streams in, so
an oversized body is never held whole. Every refusal carries OpenAI's error body.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dendrite_jax.serve.errors import ApiError

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind_host: str) -> list[str]:
    """The Host names a server bound to `bind_host` answers by default: localhost names when
    bound to a loopback address (a browser page elsewhere cannot reach it by a DNS name it
    controls), any name otherwise."""
    if bind_host == "localhost":
        return list(LOCAL_HOSTS)
    try:
        loopback = ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        return ["*"]
    return list(dict.fromkeys([*LOCAL_HOSTS, bind_host])) if loopback else ["*"]


def host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware enforcing the allowed hosts, the API key, JSON bodies and a body limit;
    it buffers a POST body (at most `max_body_bytes`) and hands it on whole."""

    def __init__(self, app: ASGIApp, *, api_key: str | None = None,
                 allowed_hosts: Iterable[str] = ("*",),
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        hosts = [h.strip().lower() for h in allowed_hosts if h.strip()]
        self.any_host = "*" in hosts
        self.hosts = {h for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        try:
            self._check_headers(scope, headers)
            if scope["method"] == "POST":
                receive = await self._buffered(receive)
        except ApiError as e:
            await JSONResponse(e.body(), status_code=e.status,
                               headers=e.headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope: Scope, headers: dict[str, str]) -> None:
        if not self._host_allowed(headers.get("host", "")):
            raise ApiError(400, "this server does not answer to the Host "
                           f"{headers.get('host', '')!r} (see --allowed_hosts)",
                           code="invalid_host")
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("latin-1"), self.api_key):
                raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                               "<key>'", code="invalid_api_key",
                               headers={"www-authenticate": "Bearer"})
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                raise ApiError(415, f"the request body must be JSON (Content-Type: "
                               f"application/json), got {media or 'no content type'!r}",
                               code="unsupported_media_type")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()

    def _host_allowed(self, header: str) -> bool:
        if self.any_host:
            return True
        name = host_name(header)
        return name in self.hosts or (bool(self.suffixes) and name.endswith(self.suffixes))

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.max_body_bytes:,} bytes (the "
                        "server's --max_body_bytes)", code="request_too_large")

    async def _buffered(self, receive: Receive) -> Receive:
        """Read the body as it arrives, refusing it once past the limit; a `receive` that
        replays it whole, then passes later messages (a disconnect) through."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message], receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks),
                         "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replayed() -> Message:
        return messages.pop(0) if messages else await receive()
    return replayed
