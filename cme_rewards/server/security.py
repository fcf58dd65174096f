"""Request guards: bearer token (401), body size limit (413), request lifetime (timeout and
client hang-up), and per-request accounting."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cme_rewards.server.metrics import CLIENT_CLOSED, Metrics

TOKEN_ENV = "CME_REWARDS_TOKEN"
"""Environment variable holding the bearer token when ``--token`` is not given."""


def _reply(status: int, detail: str, **headers: str) -> JSONResponse:
    """A JSON error answer ``{"detail": ...}``; ``retry_after="1"`` sets ``Retry-After: 1``."""
    return JSONResponse(
        {"detail": detail}, status, {k.replace("_", "-"): v for k, v in headers.items()}
    )


@dataclass
class TokenGuard:
    """ASGI middleware answering 401 unless the request carries the bearer token.

    Accepts ``Authorization: Bearer <token>`` or ``?token=<token>`` (OpenRLHF's client sends no
    headers: pass ``--reward.remote_url http://host:port/get_reward?token=...``). Every path but
    ``open_paths`` needs it, unknown paths and the API docs included. Without a token it lets all in.
    """

    app: ASGIApp
    token: str | None
    open_paths: tuple[str, ...] = ()

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
            and self.token
            and scope.get("path", "") not in self.open_paths
            and not secrets.compare_digest(self._given(scope), self.token.encode())
        ):
            await _reply(401, "missing or wrong bearer token", www_authenticate="Bearer")(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)


@dataclass
class BodySizeLimit:
    """ASGI middleware answering 413 to a request body over ``max_bytes`` (by ``Content-Length``
    before reading, and counting the bytes of chunked bodies as they come)."""

    app: ASGIApp
    max_bytes: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body over {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _reply(413, detail)(scope, receive, send)
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


@dataclass
class RequestLifetime:
    """ASGI middleware bounding a request's life: ``timeout`` seconds, and no longer than its client.

    The app runs as a task, cancelled (so its waiting samples leave the queue) when the client hangs
    up after its body, or ``timeout`` seconds after the headers: then the answer is 408 if the body
    had not all arrived, else 503 with ``Retry-After`` (and ``on_timeout`` is called).
    """

    app: ASGIApp
    timeout: float
    on_timeout: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = asyncio.Event()
        started = finished = False

        async def watch() -> Message:
            """After the body, the server's next message is ``http.disconnect`` (or the end)."""
            await body_done.wait()
            return await receive()

        watcher: asyncio.Task[Message] = asyncio.ensure_future(watch())

        async def app_receive() -> Message:
            if body_done.is_set():  # asked again after the body: what the watcher hears
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        try:
            waiting: set[asyncio.Future[Any]] = {handler, watcher}
            while True:
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if handler in done:
                    handler.result()  # re-raises the app's exception, if any
                    return
                if watcher in done:
                    waiting = {handler}
                    hung_up = (
                        watcher.cancelled()
                        or watcher.exception() is not None
                        or watcher.result()["type"] == "http.disconnect"
                    )
                    if hung_up and not finished:
                        await _cancel(handler)
                        return
                    continue
                # the deadline passed
                await _cancel(handler)
                if started:
                    return  # a response is under way; the server closes the connection
                if not body_done.is_set():
                    detail = f"request body not received within request_timeout={self.timeout:g} s"
                    await _reply(408, detail, connection="close")(scope, receive, send)
                    return
                if self.on_timeout is not None:
                    self.on_timeout()
                detail = f"not scored within request_timeout={self.timeout:g} s"
                await _reply(503, detail, retry_after="1")(scope, receive, send)
                return
        finally:
            for task in (watcher, handler):
                task.cancel()  # a no-op once done


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until its clean-up (``finally`` blocks) has run."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: it ended with an error while being cancelled


@dataclass
class RequestAccounting:
    """ASGI middleware recording every HTTP request's route, status and latency in ``metrics``
    (a request its client left before the answer counts as status 499)."""

    app: ASGIApp
    metrics: Metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def record_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_send)
        except BaseException:
            status = status or 500
            raise
        finally:
            self.metrics.record_request(
                scope.get("path", ""), status or CLIENT_CLOSED, time.perf_counter() - start
            )
