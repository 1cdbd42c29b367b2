"""Concurrency limit: a bounded number of renders in flight per worker, a short queue, then 503.

A *render* is a request that reads pixels (tiles, previews, parts, features,
statistics, points, thumbnails: routes whose `tiler.operations.Operation` needs
the ``tiles``, ``preview`` or ``data`` right). Metadata routes are never held, nor
raw file streams (`tiler.stream` bounds those itself).
The limit is taken by `render_slot`, the first application-wide dependency: it
runs on the event loop right after routing, before any threadpool work, so a
refused request costs no thread and no database connection.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import AsyncIterator

from fastapi import HTTPException
from starlette.requests import Request

from tiler import deadline, metrics
from tiler.operations import declared


class _Waiter:
    __slots__ = ("future", "granted")

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future
        self.granted = False


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class RenderLimiter:
    """At most ``max_renders`` holders; up to ``queue`` waiters for ``timeout`` seconds each.

    A slot released while someone waits goes straight to the oldest waiter, so
    a queued request is never overtaken by a newcomer.
    """

    def __init__(self, max_renders: int, queue: int, timeout: float):
        """Limits of one worker (one process)."""
        self.max_renders = max_renders
        self.queue = queue
        self.timeout = timeout
        self.retry_after = str(max(1, math.ceil(timeout)))
        self.active = 0
        self._waiters: deque[_Waiter] = deque()
        self._lock = threading.Lock()  # the app may be driven by more than one event loop (tests)

    def _publish(self) -> None:
        metrics.RENDERS_IN_FLIGHT.set(self.active)
        metrics.RENDERS_QUEUED.set(len(self._waiters))

    def _reject(self, reason: str, detail: str) -> HTTPException:
        metrics.RENDER_REJECTIONS.labels(reason=reason).inc()
        return HTTPException(503, detail, headers={"Retry-After": self.retry_after})

    async def acquire(self) -> None:
        """Take a slot, wait in the queue, or raise a 503 `HTTPException`."""
        with self._lock:
            if self.active < self.max_renders and not self._waiters:
                self.active += 1
                self._publish()
                return
            if len(self._waiters) >= self.queue:
                raise self._reject("full", "Server busy: too many renders in progress, retry later.")
            waiter = _Waiter(asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
            self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.timeout)
        except BaseException as exc:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
                    self._publish()
            if granted and isinstance(exc, TimeoutError):
                return  # the slot arrived as the timer fired: keep it
            if granted:
                self.release()
            if isinstance(exc, TimeoutError):
                raise self._reject(
                    "timeout", f"Server busy: no render slot within {self.timeout:g} s, retry later."
                ) from None
            raise

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted = True
                waiter.future.get_loop().call_soon_threadsafe(_wake, waiter.future)
            else:
                self.active -= 1
            self._publish()


async def render_slot(request: Request) -> AsyncIterator[None]:
    """Application-wide dependency: hold a render slot while a pixel-reading endpoint runs."""
    limiter: RenderLimiter | None = getattr(request.app.state, "render_limiter", None)
    op = declared(request.scope.get("route"))
    if limiter is None or op is None or not op.renders:
        yield
        return
    await limiter.acquire()
    try:
        # waiting in the queue may have taken the request past its deadline, or its client away
        deadline.check("rendering")
        yield
    finally:
        limiter.release()
