"""Request deadlines: a 504 when a request runs out of time, and readers that stop early.

`DeadlineMiddleware` gives every HTTP request a `Budget` (``TILER_API_REQUEST_TIMEOUT``
seconds). When it runs out the client gets a 504 JSON answer at once and the event loop
moves on; the request's task is left to finish in the background. Python cannot kill the
threadpool thread rendering it, so the thread is bounded in two other ways:

* GDAL's own HTTP timeouts (checked at start-up to fit in the deadline, see
  `tiler.settings.Settings`) end any read stuck on a dead or slow host;
* readers check the budget before opening each mosaic item and each asset
  (`Budget.check`), so a request past its deadline — or whose client went away —
  reads nothing more.

The budget travels in a context variable: anyio copies it into the threadpool thread
that runs a sync endpoint, but not into the ``ThreadPoolExecutor`` threads rio-tiler
reads mosaic items and assets with, so readers take it as an explicit argument
(`tiler.reader`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from typing import Any

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tiler.errors import DeadlineExceeded, RequestCancelled

logger = logging.getLogger(__name__)


class Budget:
    """The time left to a request, and whether its client is still there."""

    def __init__(self, timeout: float):
        """Start a budget of ``timeout`` seconds from now."""
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.disconnected = threading.Event()
        #: seconds this request may still wait for database connections (`tiler.db.BudgetedPool`)
        self.pool_wait_left: float | None = None

    def remaining(self) -> float:
        """Seconds left (negative once expired)."""
        return self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.remaining() <= 0

    def check(self, what: str = "reading") -> None:
        """Raise when the request should stop (deadline passed or client gone)."""
        if self.disconnected.is_set():
            raise RequestCancelled(f"client disconnected; stopped before {what}")
        if self.expired:
            raise DeadlineExceeded(f"request deadline of {self.timeout:g} s passed; stopped before {what}")


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("tiler_budget", default=None)


def current() -> Budget | None:
    """The budget of the request being served in this context, if any."""
    return _current.get()


def check(what: str = "reading", budget: Budget | None = None) -> None:
    """`Budget.check` on ``budget`` or the current request's budget (no-op outside requests)."""
    budget = budget or current()
    if budget is not None:
        budget.check(what)


def _timeout_body(timeout: float) -> bytes:
    return (
        b'{"detail":"The request did not complete within its deadline of '
        + f"{timeout:g}".encode()
        + b' s; retry later or ask for less."}'
    )


class DeadlineMiddleware:
    """Answer 504 when a request exceeds ``timeout`` seconds; track the renders left behind.

    The application runs in its own task, so the 504 goes out on time even though a sync
    endpoint's thread cannot be interrupted. Messages the late task sends afterwards are
    dropped. `abandoned` holds those late tasks until they end (tests and metrics read it).
    While the request runs, the middleware also listens for the client's disconnect and
    marks the budget, so readers stop before the next item.
    """

    def __init__(self, app: ASGIApp, timeout: float, abandoned: set | None = None):
        """Wrap ``app``; ``timeout`` in seconds; ``abandoned``: a set to keep late tasks in."""
        self.app = app
        self.timeout = timeout
        self.abandoned: set[asyncio.Task] = abandoned if abandoned is not None else set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request under its budget."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = Budget(self.timeout)
        state: dict[str, Any] = {"started": False, "late": False, "open_ended": False}
        # an endpoint whose body may rightly outlast the deadline (a raw file stream, with its
        # own per-chunk timeout) sets "open_ended" here; the deadline then ends at the first byte
        scope["dinamis.deadline"] = state
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def listen() -> None:
            # Read ahead from the server: the app gets every message through `inbox`,
            # and a disconnect marks the budget at once.
            while True:
                message = await receive()
                await inbox.put(message)
                if message["type"] == "http.disconnect":
                    budget.disconnected.set()
                    return

        async def app_receive() -> Message:
            return await inbox.get()

        async def app_send(message: Message) -> None:
            if state["late"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        token = _current.set(budget)
        try:
            task = asyncio.ensure_future(self.app(scope, app_receive, app_send))  # copies the context
        finally:
            _current.reset(token)
        listener = asyncio.ensure_future(listen())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            listener.cancel()
            raise
        if task not in done and state["started"] and state["open_ended"]:
            try:
                await task
            finally:
                listener.cancel()
            return
        if task in done:
            listener.cancel()
            task.result()  # re-raise the application's error, as without this middleware
            return

        state["late"] = True
        self.abandoned.add(task)
        started = budget.started

        def _finished(t: asyncio.Task) -> None:
            self.abandoned.discard(t)
            listener.cancel()
            logger.info(
                "request past its deadline finished %.2f s after it (%s)",
                time.monotonic() - started - self.timeout,
                get_route_path(scope),
            )
            if not t.cancelled() and t.exception() is not None:
                logger.debug("late request ended with %s", type(t.exception()).__name__)

        task.add_done_callback(_finished)
        logger.warning("request deadline of %g s exceeded: %s", self.timeout, get_route_path(scope))
        if state["started"]:
            return  # a streaming body is under way: nothing sensible can be sent any more
        body = _timeout_body(self.timeout)
        await send(
            {
                "type": "http.response.start",
                "status": 504,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
