"""Request guards: bearer token (401), body size limit (413), and per-request accounting."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException

from cme_rewards.server.metrics import Metrics

TOKEN_ENV = "CME_REWARDS_TOKEN"
"""Environment variable holding the bearer token when ``--token`` is not given."""

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(
    send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TokenGuard:
    """ASGI middleware answering 401 unless the request carries the bearer token.

    Accepts ``Authorization: Bearer <token>`` or ``?token=<token>`` (OpenRLHF's client sends no
    headers: pass ``--reward.remote_url http://host:port/get_reward?token=...``). Every path but
    ``open_paths`` needs it, unknown paths and the API docs included. Without a token it lets all in.
    """

    def __init__(self, app: ASGIApp, token: str | None, open_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.expected = token.encode() if token else None
        self.open_paths = open_paths

    def _given(self, scope: Scope) -> bytes:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                if scheme.lower() == b"bearer" and given.strip():
                    return given.strip()
        for pair in scope.get("query_string", b"").split(b"&"):
            key, _, value = pair.partition(b"=")
            if key == b"token":
                return unquote_to_bytes(value.replace(b"+", b" ")).strip()
        return b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.expected is not None
            and scope.get("path", "") not in self.open_paths
            and not secrets.compare_digest(self._given(scope), self.expected)
        ):
            await _send_json(
                send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
            )
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware answering 413 to a request body over ``max_bytes``.

    Checks ``Content-Length`` before reading, and counts the bytes of chunked bodies as they come.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body over {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_json(send, 413, detail)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; its handler answers 413.
                    raise HTTPException(status_code=413, detail=detail)
            return message

        await self.app(scope, limited_receive, send)


class RequestAccounting:
    """ASGI middleware recording every HTTP request's path, status and latency in ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_send)
        finally:
            self.metrics.record_request(scope.get("path", ""), status, time.perf_counter() - start)
