"""Caching: the ``Cache-Control`` policy and the in-process cache of rendered tiles.

* `CachePolicyMiddleware`: public only for anonymous answers, private for protected ones,
  no-store for errors.
* `TileCache` and `CachedRoute`: rendered tiles kept in memory (LRU bounded in bytes, with
  a time to live), served again only after the caller's rights are checked.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from cachetools import TTLCache
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from titiler.mosaic.errors import NoAssetFoundError

from tiler.access import SCOPE_CACHE, authorize


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


# --------------------------------------------------------------------------- rendered tile cache


@dataclass(frozen=True)
class CachedResponse:
    """A rendered answer: status, body and the headers the endpoint set."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @property
    def size(self) -> int:
        """Bytes it holds (body, headers and a fixed overhead for the key and objects)."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 512


class TileCache:
    """In-process cache of rendered tiles: LRU bounded in bytes, entries expire after ``ttl``.

    One per worker process. Keys are built by `cache_key` from the route path and the
    query (never the URL token); the caller's rights are checked on every hit by
    `CachedRoute`, so a cached tile is served only to callers the policy allows *now*.
    """

    def __init__(self, max_bytes: int, ttl: float, max_entry_bytes: int):
        """An empty cache of at most ``max_bytes``."""
        self.max_entry_bytes = max_entry_bytes
        self._data: TTLCache = TTLCache(maxsize=max_bytes, ttl=ttl, getsizeof=lambda e: e.size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedResponse | None:
        """The entry for ``key``, or None."""
        with self._lock:
            return self._data.get(key)

    def count(self, hit: bool) -> None:
        """Count a tile served from the cache (``hit``) or rendered and offered to it."""
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, key: str, entry: CachedResponse) -> None:
        """Store ``entry`` unless it is larger than one entry may be."""
        if entry.size > min(self.max_entry_bytes, self._data.maxsize):
            return
        with self._lock:
            self._data[key] = entry

    @property
    def size(self) -> int:
        """Bytes held now."""
        with self._lock:
            return int(self._data.currsize)

    def __len__(self) -> int:
        """Entries held now."""
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._data.clear()


#: headers of a rendered answer that are not kept (recomputed, or per request)
_SKIPPED = {b"content-length", b"date", b"server-timing", b"x-tile-cache", b"x-request-id"}
CACHE_HEADER = "X-Tile-Cache"


def cache_key(request: Request) -> str:
    """What makes a tile: method, route path (without ``/t/<token>``) and the sorted query (without ``token``)."""
    query = sorted((k, v) for k, v in request.query_params.multi_items() if k != "token")
    return f"{request.method} {get_route_path(request.scope)}?{urlencode(query)}"


def not_modified(request: Request, etag: str) -> bool:
    """True when the request's ``If-None-Match`` matches ``etag`` (answer 304)."""
    header = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in header.split(",") if tag.strip())


def _cacheable(response: Response) -> bool:
    media = (response.media_type or response.headers.get("content-type") or "").lower()
    return response.status_code == 200 and media.startswith("image/") and hasattr(response, "body")


class CachedRoute(APIRoute):
    """Route class of titiler's tile routes: rendered tiles come from `TileCache` when they can.

    On a hit, the application-wide ``authorize`` dependency runs first (the same
    check as on a miss: credentials, policy, zoom and scope of the caller), so access
    control stays exact; then the stored answer is sent without touching the catalogue
    or the COGs. Only ``200`` images and ``204`` (no item under a mosaic tile) are
    stored: other errors are always computed again. Without ``app.state.tile_cache`` the
    route behaves as titiler's.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler with the cache lookup and store."""
        handler = super().get_route_handler()

        async def cached(request: Request) -> Response:
            cache: TileCache | None = getattr(request.app.state, "tile_cache", None)
            if cache is None or request.method != "GET":
                return await handler(request)
            key = cache_key(request)
            entry = cache.get(key)
            if entry is not None:
                await run_in_threadpool(authorize, request)
                cache.count(hit=True)
                etag = dict(entry.headers).get(b"etag")
                if etag and not_modified(request, etag.decode("latin-1")):
                    return Response(status_code=304, headers={"ETag": etag.decode("latin-1")})
                response = Response(entry.body, status_code=entry.status)
                response.raw_headers = [
                    *((k, v) for k, v in entry.headers),
                    *((k, v) for k, v in response.raw_headers if k == b"content-length"),
                ]
                response.headers[CACHE_HEADER] = "hit"
                return response
            try:
                response = await handler(request)
            except NoAssetFoundError:
                # no item under this mosaic tile: the error table answers 204; remember that
                cache.count(hit=False)
                cache.put(key, CachedResponse(204, b"", ()))
                raise
            if _cacheable(response):
                cache.count(hit=False)
                body = getattr(response, "body", b"")
                headers = tuple((k, v) for k, v in response.raw_headers if k not in _SKIPPED)
                cache.put(key, CachedResponse(response.status_code, bytes(body), headers))
                response.headers[CACHE_HEADER] = "miss"
            return response

        return cached
