"""One retry policy for transient trouble, used by every surface (remote verifiers, veRL, OpenRLHF).

Up to ``tries`` attempts; after failed attempt ``k`` (0-based) the caller waits
:func:`backoff_delay` ``= min(0.5 * 2**k, 8)`` seconds (0.5, 1, 2, 4, 8, 8, ...). Only exceptions
``transient`` (default :func:`is_transient`) accepts are retried; others, and the last, propagate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRIES = 5


class TransientError(RuntimeError):
    """Trouble that may pass if the caller retries (a server answers 503 for it)."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass on a retry: overload, timeout, or out of (GPU) memory."""
    if isinstance(exc, TransientError | TimeoutError | MemoryError):
        return True
    return type(exc).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError (CUDA / MPS)


def backoff_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0-based)."""
    return min(0.5 * 2**attempt, 8.0)


def _retry_delay(exc: BaseException, attempt: int, tries: int, what: str, transient) -> float:
    """Seconds to wait before retrying after ``exc`` (logged); re-raises it when it is final."""
    if not transient(exc) or attempt + 1 >= tries:
        raise exc
    delay = backoff_delay(attempt)
    logger.warning(
        "%s: %r; retry %d of %d in %.1f s", what, str(exc), attempt + 1, tries - 1, delay
    )
    return delay


async def retry_async(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    tries: int = DEFAULT_TRIES,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Await ``call()`` until it succeeds or fails for good (see the module docstring)."""
    for attempt in range(tries):
        try:
            return await call()
        except Exception as exc:  # noqa: PERF203 - the retry loop is the point
            await asyncio.sleep(_retry_delay(exc, attempt, tries, what, transient))
    raise AssertionError("unreachable")  # pragma: no cover


def retry_sync(
    call: Callable[[], T],
    *,
    what: str,
    tries: int = DEFAULT_TRIES,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``call()`` until it succeeds or fails for good (see the module docstring)."""
    for attempt in range(tries):
        try:
            return call()
        except Exception as exc:  # noqa: PERF203
            time.sleep(_retry_delay(exc, attempt, tries, what, transient))
    raise AssertionError("unreachable")  # pragma: no cover
