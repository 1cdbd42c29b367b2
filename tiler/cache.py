"""Cache-Control policy: public only for anonymous answers, private for protected ones, no-store for errors."""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette._utils import get_route_path
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tiler.access import SCOPE_CACHE


class CachePolicyMiddleware:
    """Set ``Cache-Control`` on GET/HEAD answers that have none.

    * status >= 400: ``no-store`` (an error must not stick in a cache);
    * the request carried a credential (the authorize dependency marks it):
      ``private`` — a shared cache or CDN must not serve it to someone else;
    * otherwise (anonymous, allowed by the policy, or access control off): the
      public value.
    Paths matching ``exclude`` (health, search registration, /auth) get
    ``no-store`` unless the endpoint set its own header.
    """

    def __init__(self, app: ASGIApp, public: str, private: str, exclude: Iterable[str] = ()):
        """Wrap ``app`` with the two header values."""
        self.app = app
        self.public = public
        self.private = private
        self.exclude = [re.compile(p) for p in exclude]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Decide the header when the response starts."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict[str, bool] = {"private": False}
        scope[SCOPE_CACHE] = holder

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                status = message["status"]
                if status >= 400:
                    headers["Cache-Control"] = "no-store"
                elif "cache-control" not in headers:
                    if any(p.match(get_route_path(scope)) for p in self.exclude):
                        headers["Cache-Control"] = "no-store"
                    elif scope["method"] in ("GET", "HEAD"):
                        headers["Cache-Control"] = self.private if holder["private"] else self.public
                if holder["private"]:
                    headers.add_vary_header("Authorization")
            await send(message)

        await self.app(scope, receive, send_wrapper)
