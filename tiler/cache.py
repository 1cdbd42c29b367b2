"""Caching: the ``Cache-Control`` policy and the in-process cache of rendered tiles.

* `CachePolicyMiddleware`: public only for anonymous answers, private for protected ones,
  no-store for errors.
* `TileCache` and `CachedRoute`: rendered tiles kept in memory (LRU bounded in bytes, with
  a time to live), then in an optional shared store (`tiler.rediscache`, Redis, for every
  worker and replica), served again only after the caller's rights are checked.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from cachetools import TLRUCache
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from titiler.mosaic.errors import NoAssetFoundError

from tiler.access import SCOPE_CACHE, authorize_request
from tiler.metrics import TILE_CACHE
from tiler.operations import declared

if TYPE_CHECKING:
    from tiler.rediscache import RedisTileStore
    from tiler.settings import TileCacheSettings

logger = logging.getLogger(__name__)


class CachePolicyMiddleware:
    """Set ``Cache-Control`` on GET/HEAD answers that have none.

    * status >= 400: ``no-store`` (an error must not stick in a cache);
    * the request carried a credential (the authorize dependency marks it):
      ``private`` — a shared cache or CDN must not serve it to someone else;
    * otherwise (anonymous, allowed by the policy, or access control off): the
      public value.
    Routes whose `tiler.operations.Operation` says ``store=False`` (health, search
    registration and lists, /auth, /metrics) get ``no-store`` unless the endpoint set
    its own header.
    """

    def __init__(self, app: ASGIApp, public: str, private: str):
        """Wrap ``app`` with the two header values."""
        self.app = app
        self.public = public
        self.private = private

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
                    op = declared(scope.get("route"))  # set by the router, in this same scope
                    if op is not None and not op.store:
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
    """A rendered answer: status, body and the headers the endpoint set.

    ``ttl``: seconds it may still be served, when less than the cache's own time to
    live (an entry read from the shared store lives no longer than it does there).
    """

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    ttl: float | None = None

    @property
    def size(self) -> int:
        """Bytes it holds (body, headers and a fixed overhead for the key and objects)."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 512


class TileCache:
    """In-process cache of rendered tiles: LRU bounded in bytes, entries expire after ``ttl``.

    One per worker process, in front of an optional ``shared`` store (Redis) that every
    worker and replica reads and writes. Keys are built by `cache_key` from the route
    path and the query (never the URL token); the caller's rights are checked on every
    hit, whatever the tier, by `CachedRoute`, so a cached tile is served only to callers
    the policy allows *now*.

    Counters (plain attributes, read by the metrics): ``hits`` (in-process),
    ``shared_hits`` (from the shared store), ``misses`` (rendered), ``shared_errors``.
    """

    def __init__(
        self, max_bytes: int, ttl: float, max_entry_bytes: int, shared: RedisTileStore | None = None
    ):
        """An empty cache of at most ``max_bytes``, in front of ``shared`` if given."""
        self.max_entry_bytes = max_entry_bytes
        self.ttl = ttl
        self.shared = shared
        self._data: TLRUCache = TLRUCache(maxsize=max_bytes, ttu=self._expires, getsizeof=lambda e: e.size)
        self._lock = threading.Lock()
        self.hits = 0
        self.shared_hits = 0
        self.misses = 0

    def _expires(self, _key: str, entry: CachedResponse, now: float) -> float:
        return now + min(self.ttl, math.inf if entry.ttl is None else entry.ttl)

    def get(self, key: str) -> CachedResponse | None:
        """The entry for ``key``, or None."""
        with self._lock:
            return self._data.get(key)

    def count(self, hit: bool, shared: bool = False) -> None:
        """Count a tile served from the cache (``hit``; ``shared``: from the shared store) or rendered."""
        with self._lock:
            if hit and shared:
                self.shared_hits += 1
            elif hit:
                self.hits += 1
            else:
                self.misses += 1
        TILE_CACHE.labels(result="hit-shared" if hit and shared else "hit" if hit else "miss").inc()

    def usage(self) -> tuple[int, int]:
        """Bytes of rendered tiles held in this process (expired ones until evicted), and the bound."""
        with self._lock:
            return int(self._data.currsize), int(self._data.maxsize)

    @property
    def shared_errors(self) -> int:
        """Failed calls to the shared store (connection, timeout, server error)."""
        return self.shared.errors if self.shared is not None else 0

    def put(self, key: str, entry: CachedResponse) -> None:
        """Store ``entry`` in this process unless it is larger than one entry may be."""
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
        """Drop every entry of this process (the shared store keeps its own)."""
        with self._lock:
            self._data.clear()


#: headers of a rendered answer that are not kept (recomputed, or per request)
_SKIPPED = {b"content-length", b"date", b"server-timing", b"x-tile-cache", b"x-request-id"}
CACHE_HEADER = "X-Tile-Cache"


def picture_params(request: Request) -> list[tuple[str, str]]:
    """The query parameters that make the picture, sorted by name (not the URL token).

    The sort is stable and by name only: repeated parameters keep their order, which is the
    band order (``bidx=3&bidx=2&bidx=1`` is another picture than ``bidx=1&bidx=2&bidx=3``).
    """
    return sorted(
        ((k, v) for k, v in request.query_params.multi_items() if k != "token"), key=lambda kv: kv[0]
    )


def cache_key(request: Request) -> str:
    """What makes a tile: method, route path (without ``/t/<token>``) and the sorted query (without ``token``)."""
    query = picture_params(request)
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

    Lookup order: this process, then the shared store (a hit there fills this process);
    a render is written to both. The shared store's calls block (bounded by its socket
    timeout, skipped while it is down) and run in the thread pool.
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
            shared = False
            if entry is None and cache.shared is not None:
                entry = await run_in_threadpool(cache.shared.get, key)
                if entry is not None:
                    shared = True
                    cache.put(key, entry)
            if entry is not None:
                await authorize_request(request)
                cache.count(hit=True, shared=shared)
                etag = dict(entry.headers).get(b"etag")
                if etag and not_modified(request, etag.decode("latin-1")):
                    return Response(status_code=304, headers={"ETag": etag.decode("latin-1")})
                response = Response(entry.body, status_code=entry.status)
                response.raw_headers = [
                    *((k, v) for k, v in entry.headers),
                    *((k, v) for k, v in response.raw_headers if k == b"content-length"),
                ]
                response.headers[CACHE_HEADER] = "hit-shared" if shared else "hit"
                return response
            try:
                response = await handler(request)
            except NoAssetFoundError:
                # no item under this mosaic tile: the error table answers 204; remember that
                cache.count(hit=False)
                await _store(cache, key, CachedResponse(204, b"", ()))
                raise
            if _cacheable(response):
                cache.count(hit=False)
                body = getattr(response, "body", b"")
                headers = tuple((k, v) for k, v in response.raw_headers if k not in _SKIPPED)
                await _store(cache, key, CachedResponse(response.status_code, bytes(body), headers))
                response.headers[CACHE_HEADER] = "miss"
            return response

        return cached


async def _store(cache: TileCache, key: str, entry: CachedResponse) -> None:
    """Keep a rendered answer in this process and in the shared store."""
    cache.put(key, entry)
    if cache.shared is not None and entry.size <= cache.max_entry_bytes:
        cache.shared.put_soon(key, entry)  # in the background: the answer does not wait for Redis


def tile_cache(cache: TileCacheSettings) -> TileCache:
    """The in-process tile cache, in front of the shared Redis when ``TILER_CACHE_REDIS_URL`` is set."""
    max_entry_bytes = int(cache.max_entry_kb * 1024)
    shared = None
    if cache.redis_url is not None:
        from tiler.rediscache import RedisTileStore  # the `redis` extra, only when asked for

        shared = RedisTileStore(
            cache.redis_url.get_secret_value(),
            prefix=cache.redis_prefix,
            ttl=cache.ttl,
            timeout=cache.redis_timeout,
            backoff=cache.redis_backoff,
            max_entry_bytes=max_entry_bytes,
        )
        logger.info("tile cache: in-process, then shared Redis at %s", shared.where)
    return TileCache(
        max_bytes=int(cache.max_mb * 1024 * 1024),
        ttl=cache.ttl,
        max_entry_bytes=max_entry_bytes,
        shared=shared,
    )
