"""Request guards: bearer token (401), body size limit (413), request lifetime (timeout and
client hang-up), and per-request accounting."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException

from cme_rewards.server.metrics import CLIENT_CLOSED, Metrics

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


class RequestLifetime:
    """ASGI middleware bounding a request's life: ``timeout`` seconds, and no longer than its client.

    The rest of the app runs as a task, which is cancelled when

    - ``timeout`` seconds have passed since the request's headers arrived (body upload, parsing,
      prompt recovery, tokenization, queueing and scoring all count): the answer is 408 if the body
      had not all arrived yet, else 503 with ``Retry-After`` (``on_timeout`` is called);
    - the client hangs up after sending its body: nobody is left to answer.

    Cancelling the task takes the request's waiting samples out of the micro-batch queue, so work
    nobody waits for is never computed.
    """

    def __init__(
        self, app: ASGIApp, timeout: float, on_timeout: Callable[[], None] | None = None
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.on_timeout = on_timeout

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
                    await _send_json(send, 408, detail, [(b"connection", b"close")])
                    return
                if self.on_timeout is not None:
                    self.on_timeout()
                detail = f"not scored within request_timeout={self.timeout:g} s"
                await _send_json(send, 503, detail, [(b"retry-after", b"1")])
                return
        finally:
            for task in (watcher, handler):
                if not task.done():
                    task.cancel()


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until its clean-up (``finally`` blocks) has run."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: it ended with an error while being cancelled


class RequestAccounting:
    """ASGI middleware recording every HTTP request's route, status and latency in ``metrics``.

    A request that ends without a response (its client hung up first) counts as status 499.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

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
