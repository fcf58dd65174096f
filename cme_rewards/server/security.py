"""Request guards: bearer token (401), body size limit (413), and per-request accounting."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request

from cme_rewards.server.metrics import Metrics

TOKEN_ENV = "CME_REWARDS_TOKEN"
"""Environment variable holding the bearer token when ``--token`` is not given."""

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def token_checker(token: str | None) -> Callable[[Request], None]:
    """A FastAPI dependency accepting ``Authorization: Bearer <token>`` or ``?token=<token>``.

    The query form exists because OpenRLHF's client sends no headers: pass
    ``--reward.remote_url http://host:port/get_reward?token=...``. Without a token it accepts all.
    """
    expected = token.encode() if token else None

    def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            given = request.query_params.get("token", "")
        if not secrets.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
