"""Prometheus metrics, the per-request access log, request ids and ``Server-Timing``.

`ObservabilityMiddleware` wraps every request: it gives it an id (an incoming
well-formed ``X-Request-ID`` or a new one, echoed in the response), times it,
counts it by *route template* (the matched route's path, never the raw URL, so
neither ids nor URL tokens reach a label), writes one access log line and adds
the database time to ``Server-Timing``. Database time comes from
`tiler.db.TimedCursor`, origin (COG host) traffic from GDAL's own network
statistics, pool usage from psycopg_pool's ``get_stats()`` at scrape time.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several workers), prometheus_client keeps
values in files there and ``/metrics`` sums every worker's.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tiler import native
from tiler.logs import REQUEST_ID
from tiler.operations import SELF_GUARDED
from tiler.settings import ObservabilitySettings

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("tiler.http")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# --------------------------------------------------------------------------- metric families

REQUESTS = Counter(
    "tiler_http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "tiler_http_request_duration_seconds",
    "Time to serve a request (body sent), by method, route template and status.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
RENDERS_IN_FLIGHT = Gauge(
    "tiler_renders_in_flight", "Pixel-reading requests holding a render slot.", multiprocess_mode="livesum"
)
RENDERS_QUEUED = Gauge(
    "tiler_renders_queued", "Pixel-reading requests waiting for a render slot.", multiprocess_mode="livesum"
)
RENDER_REJECTIONS = Counter(
    "tiler_render_rejections_total",
    "Renders refused with 503: queue full (`full`) or no slot in time (`timeout`).",
    ["reason"],
)
TILE_CACHE = Counter(
    "tiler_tile_cache_requests_total",
    "Rendered tiles served from the cache (`hit`: worker memory, `hit-shared`: Redis) or rendered (`miss`).",
    ["result"],
)
TILE_CACHE_SHARED_ERRORS = Counter(
    "tiler_tile_cache_shared_errors_total", "Failed calls to the shared (Redis) tile cache."
)
PGSTAC_QUERY = Histogram(
    "tiler_pgstac_query_duration_seconds",
    "Time of each query to the pgstac database (the pool's checkout check included).",
    buckets=DB_BUCKETS,
)
ORIGIN_REQUESTS = Counter(
    "tiler_origin_requests_total",
    "HTTP requests GDAL made to COG hosts, by host and method.",
    ["host", "method"],
)
ORIGIN_BYTES = Counter("tiler_origin_bytes_total", "Bytes GDAL downloaded from COG hosts, by host.", ["host"])
STREAM_BYTES = Counter(
    "tiler_stream_bytes_total",
    "Bytes of asset files relayed to clients by /stream (raw COG streaming), by collection.",
    ["collection"],
)
STREAM_REDIRECTS = Counter(
    "tiler_stream_redirects_total",
    "Stream requests answered with a redirect to a presigned storage URL (prefixes with "
    "`stream: redirect`; the bytes then go from the storage to the client), by collection.",
    ["collection"],
)
STREAMS_IN_FLIGHT = Gauge(
    "tiler_streams_in_flight", "Raw file streams open (/stream).", multiprocess_mode="livesum"
)
STREAM_REFUSED = Counter(
    "tiler_stream_refused_total",
    "Streams refused with 429: the caller's (`user`) or the worker's (`total`) cap reached.",
    ["reason"],
)

FAMILIES = (
    REQUESTS,
    LATENCY,
    RENDERS_IN_FLIGHT,
    RENDERS_QUEUED,
    RENDER_REJECTIONS,
    TILE_CACHE,
    TILE_CACHE_SHARED_ERRORS,
    PGSTAC_QUERY,
    ORIGIN_REQUESTS,
    ORIGIN_BYTES,
    STREAM_BYTES,
    STREAM_REDIRECTS,
    STREAMS_IN_FLIGHT,
    STREAM_REFUSED,
)
for _result in ("hit", "hit-shared", "miss"):
    TILE_CACHE.labels(result=_result)  # exported at 0 before the first tile
for _reason in ("full", "timeout"):
    RENDER_REJECTIONS.labels(reason=_reason)


# --------------------------------------------------------------------------- per-request figures


@dataclass
class RequestStats:
    """What one request spent (shared with the threadpool through a context variable)."""

    db_seconds: float = 0.0


CURRENT: ContextVar[RequestStats | None] = ContextVar("tiler_request_stats", default=None)


def observe_query(seconds: float) -> None:
    """Record one pgstac query (called by `tiler.db.TimedCursor`)."""
    PGSTAC_QUERY.observe(seconds)
    stats = CURRENT.get()
    if stats is not None:
        stats.db_seconds += seconds


# --------------------------------------------------------------------------- origin traffic (GDAL)


class OriginStats:
    """GDAL's network statistics (``CPL_VSIL_NETWORK_STATS_ENABLED``) folded into counters.

    GDAL decides once per process whether to count, at its first network
    access: `enable` must run before any remote read. The statistics are
    process-wide and keep one entry per file, so they are harvested (read then
    reset) at each scrape and at most every ``interval`` seconds by requests;
    a request finishing between the read and the reset is lost (a few per
    million at worst).
    """

    def __init__(self, interval: float = 30.0):
        """Harvest at most every ``interval`` seconds outside scrapes."""
        self.interval = interval
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.enabled = False

    def enable(self) -> None:
        """Ask GDAL to count (a global config option of rasterio's libgdal)."""
        native.set_config_option("CPL_VSIL_NETWORK_STATS_ENABLED", "YES")
        self.enabled = True

    def _read_and_reset(self) -> dict:
        text = native.take_network_stats()
        return json.loads(text) if text is not None else {}

    def harvest(self, force: bool = True) -> None:
        """Add what GDAL counted since the last harvest to the counters."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        with self._lock:
            self._last = now
            doc = self._read_and_reset()
        for handler in (doc.get("handlers") or {}).values():
            for path, stats in (handler.get("files") or {}).items():
                host = _host_of(path)
                for method, m in (stats.get("methods") or {}).items():
                    if m.get("count"):
                        ORIGIN_REQUESTS.labels(host=host, method=method).inc(m["count"])
                    if m.get("downloaded_bytes"):
                        ORIGIN_BYTES.labels(host=host).inc(m["downloaded_bytes"])
            for action in (handler.get("actions") or {}).values():  # HEAD (Stat) is listed per action only
                for path, stats in (action.get("files") or {}).items():
                    for method, m in (stats.get("methods") or {}).items():
                        if method == "HEAD" and m.get("count"):
                            ORIGIN_REQUESTS.labels(host=_host_of(path), method=method).inc(m["count"])


def _host_of(path: str) -> str:
    """``/vsicurl/https://host:port/a/b.tif`` -> ``host:port`` (no credentials, no path)."""
    rest = re.sub(r"^/vsi\w+(?:_streaming)?/", "", path)
    if "://" not in rest:
        return rest.split("/", 1)[0] or "unknown"  # /vsis3/bucket/key
    return urlsplit(rest).netloc.rsplit("@", 1)[-1] or "unknown"


ORIGIN = OriginStats()


# --------------------------------------------------------------------------- pool usage


class PoolCollector:
    """psycopg_pool ``get_stats()`` of the app's pool, read at scrape time."""

    GAUGES = {
        "pool_size": "Connections open (in use or idle).",
        "pool_available": "Idle connections ready for a request.",
        "requests_waiting": "Requests waiting for a connection.",
        "pool_max": "Most connections the pool may open.",
    }
    COUNTERS = {
        "requests_num": ("requests", "Connections handed out since start."),
        "requests_queued": ("requests_queued", "Requests that had to wait for a connection."),
        "requests_errors": ("request_errors", "Requests that got no connection (timeout, error)."),
        "connections_lost": ("connections_lost", "Connections found broken."),
    }

    def __init__(self, pool_getter: Callable[[], Any]):
        """``pool_getter`` returns the pool (opened in the lifespan) or None."""
        self._pool = pool_getter

    def collect(self) -> Iterable[Any]:
        """Gauges and counters prefixed ``tiler_db_``."""
        pool = self._pool()
        if pool is None:
            return
        stats = pool.get_stats()
        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"tiler_db_{key}", doc, value=stats.get(key, 0))
        for key, (name, doc) in self.COUNTERS.items():
            yield CounterMetricFamily(f"tiler_db_pool_{name}", doc, value=stats.get(key, 0))
        yield CounterMetricFamily(
            "tiler_db_pool_wait_seconds",
            "Time requests waited for a connection.",
            value=stats.get("requests_wait_ms", 0) / 1000,
        )


class CacheCollector:
    """Bytes held by this worker's caches and their bounds, read at scrape time.

    ``tiles`` (rendered tiles in memory, `TILER_CACHE_MAX_MB`), ``http_chunks`` (chunks of
    remote files read through `tiler.opener`, `TILER_GDAL_CPL_VSIL_CURL_CACHE_SIZE`) and
    ``gdal_blocks`` (GDAL's decoded blocks, `TILER_GDAL_GDAL_CACHEMAX`). Datasets stay open
    between requests, so these caches stay full: with the Python working set they are most
    of a worker's memory. Labelled by ``pid``: with several workers a scrape reports the
    worker that answers it, as the pool figures.
    """

    def __init__(self, tile_cache_getter: Callable[[], Any]):
        """``tile_cache_getter`` returns the app's `TileCache` (None when the cache is off)."""
        self._tile_cache = tile_cache_getter

    def usage(self) -> dict[str, tuple[int, int]]:
        """Cache name -> (bytes held, bound in bytes)."""
        from tiler.opener import CHUNKS  # tiler.opener imports this module

        out = {}
        tiles = self._tile_cache()
        if tiles is not None:
            out["tiles"] = tiles.usage()
        out["http_chunks"] = CHUNKS.usage()
        try:
            out["gdal_blocks"] = native.gdal_block_cache()
        except (OSError, AttributeError):  # a libgdal without these functions: left out
            logger.debug("GDAL block cache figures unavailable", exc_info=True)
        return out

    def collect(self) -> Iterable[Any]:
        """``tiler_cache_bytes`` and ``tiler_cache_limit_bytes`` by ``cache`` and ``pid``."""
        pid = str(os.getpid())
        held = GaugeMetricFamily(
            "tiler_cache_bytes", "Bytes each cache of this worker holds.", labels=["cache", "pid"]
        )
        bound = GaugeMetricFamily(
            "tiler_cache_limit_bytes", "The most each cache of this worker may hold.", labels=["cache", "pid"]
        )
        for name, (used, limit) in self.usage().items():
            held.add_metric([name, pid], used)
            bound.add_metric([name, pid], limit)
        yield held
        yield bound


# --------------------------------------------------------------------------- /metrics


def metrics_router(
    settings: ObservabilitySettings,
    pool_getter: Callable[[], Any],
    tile_cache_getter: Callable[[], Any] = lambda: None,
) -> APIRouter:
    """``GET /metrics``: from allowed networks or with the bearer token only."""
    registry = CollectorRegistry(auto_describe=False)
    if settings.prometheus_multiproc_dir:
        MultiProcessCollector(registry, path=settings.prometheus_multiproc_dir)
    else:
        for family in FAMILIES:
            registry.register(family)
    registry.register(PoolCollector(pool_getter))
    registry.register(CacheCollector(tile_cache_getter))
    networks = [ipaddress.ip_network(n, strict=False) for n in settings.metrics_allow]
    token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None
    router = APIRouter(dependencies=[SELF_GUARDED.depends()])  # checks its own token before any other

    def allowed(request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if (
            token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), token)
        ):
            return True
        try:
            addr = ipaddress.ip_address(request.client.host if request.client else "")
        except ValueError:
            return False
        return any(addr in n for n in networks)

    @router.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        if not allowed(request):
            raise HTTPException(403, "Metrics are not available from this address")
        ORIGIN.harvest()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


# --------------------------------------------------------------------------- the middleware


_ERROR_BODY = b'{"detail":"Internal Server Error"}'


#: (method, route, status) -> (request counter, latency histogram) children; bounded by the routes.
_CHILDREN: dict[tuple[str, str, str], tuple[Any, Any]] = {}


def route_template(scope: Scope) -> str:
    """The matched route's full path template (``<unmatched>`` when no route matched).

    FastAPI >= 0.13x keeps included routers' routes relative to their prefix in
    ``scope["route"]``; the full template is on its effective route context.
    """
    ctx = (scope.get("fastapi") or {}).get("effective_route_context")
    path = getattr(ctx, "path_format", None) or getattr(scope.get("route"), "path", None)
    if not path:
        return UNMATCHED
    # a mounted application (the STAC API at /stac): its routes are relative to the mount
    root, app_root = scope.get("root_path", ""), scope.get("app_root_path")
    if app_root is not None and root.startswith(app_root) and len(root) > len(app_root):
        path = root[len(app_root) :] + path
    return path


def _principal_id(scope: Scope) -> str | None:
    principal = (scope.get("state") or {}).get("principal")
    if principal is None:
        return None
    return principal.user or "anonymous"


def _items_touched(scope: Scope, headers: MutableHeaders | None) -> int | None:
    """Items read: ``X-Assets`` of a mosaic response (``collection/item`` list), 1 for an item's route."""
    if headers is not None and "x-assets" in headers:
        value = headers["x-assets"]
        return len(value.split(",")) if value else 0
    if "item_id" in (scope.get("path_params") or {}):
        return 1
    return None


class ObservabilityMiddleware:
    """Request id, access log line, request metrics and the ``db`` entry of ``Server-Timing``.

    Mounted inside `tiler.access.UrlTokenMiddleware`, so the scope it sees is
    the one the router fills (``route``, ``path_params``, ``state``).
    """

    def __init__(self, app: ASGIApp):
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request and account for it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        stats = RequestStats()
        CURRENT.set(stats)
        scope.setdefault("state", {})
        status = 500
        headers: MutableHeaders | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                db = f"db;dur={stats.db_seconds * 1000:.2f}"  # 0 when every answer came from a cache
                timing = headers.get("server-timing")
                headers["Server-Timing"] = f"{timing}, {db}" if timing else db
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if headers is None:  # answer here, so the 500 carries the request id too
                head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_ERROR_BODY))]
                await send_wrapper({"type": "http.response.start", "status": 500, "headers": head})
                await send_wrapper({"type": "http.response.body", "body": _ERROR_BODY})
            raise  # the server logs it, with this request's id (same task)
        finally:
            self._account(scope, status, time.perf_counter() - start, headers, stats)

    @staticmethod
    def _account(
        scope: Scope, status: int, seconds: float, headers: MutableHeaders | None, stats: RequestStats
    ) -> None:
        route = route_template(scope)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        code = str(status)
        key = (method, route, code)
        children = _CHILDREN.get(key)
        if children is None:  # labels() costs a lock and a lookup: keep the pair per series
            children = _CHILDREN[key] = (REQUESTS.labels(*key), LATENCY.labels(*key))
        children[0].inc()
        children[1].observe(seconds)
        ORIGIN.harvest(force=False)
        fields: dict[str, Any] = {
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 2),
            "db_ms": round(stats.db_seconds * 1000, 2),
            "items": _items_touched(scope, headers),
            "user": _principal_id(scope),
        }
        access_logger.info("%s %s %s %.1fms", method, route, status, seconds * 1000, extra={"fields": fields})
