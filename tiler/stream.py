"""Raw COG streaming: the asset links of the STAC API, proxied from the storage with Range support.

``GET``/``HEAD /stream/collections/{c}/items/{i}/assets/{a}`` answers with the bytes of the
asset's file, read from its storage host with the server's upstream credentials (the
per-prefix headers and signers of `tiler.upstream`). GDAL's ``/vsicurl/``, rasterio, QGIS
and pyotb read a COG through it exactly as from a static file server: single ``Range``
requests, ``206`` with ``Content-Range``, ``416`` past the end, ``ETag``/``Last-Modified``
and conditional requests passed through.

* Rights are checked on every request by the application-wide ``authorize`` dependency:
  raw bytes are the ``data`` operation of the item's collection (a grant or a URL token
  limited by ``max_zoom`` never has it). The links the STAC API hands out carry a URL token
  scoped to the one item (`tiler.stac`).
* The body is relayed chunk by chunk as the storage sends it, never buffered; a stream holds
  no render slot and its request deadline ends once the answer has started (the upstream
  read timeout bounds every chunk instead).
* Each caller has at most ``TILER_STREAM_MAX_PER_USER`` streams open per worker, and the worker
  ``TILER_STREAM_MAX_TOTAL``; past that an immediate 429 with ``Retry-After``.
* Storage faults map like the tiles': 404 (file missing), 502 (credentials refused after
  one re-sign, 5xx, redirect, cut connection), 503 + ``Retry-After`` (429/503 twice), 504
  (no answer). Messages name the item and asset, never a URL.

Proxy or redirect, per storage prefix (``stream:`` of the upstream credential): by default a
proxy, since the link stays ours (rights and revocation apply to every range request) and it
works the same for every storage (HTTP with a token header, S3 through a signer). Where the
storage can presign (S3, nginx ``secure_link``, a CDN), ``stream: redirect`` answers each
request, after the same rights check, with a ``307`` to a URL presigned for minutes: the
bytes then go from the storage to the client at the storage's speed, and GDAL reuses the
presigned URL for every range of the file until it expires, then asks this link again (so a
revoked right stops a reader within the signature's lifetime). The storage's address and a
presigned URL for that one file reach the client; no credential of the server does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Header, HTTPException, Path
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tiler import metrics
from tiler.errors import (
    UpstreamError,
    UpstreamFailed,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tiler.operations import STREAM
from tiler.settings import StreamSettings
from tiler.upstream import headers_for, redirects, signer_for

logger = logging.getLogger(__name__)

#: The last segment is the file's name, ``<item>_<asset><extension>`` (`stream_filename`): GDAL
#: set-ups that allow only ``.tif`` URLs need an extension, and GDAL probes sibling files by
#: name (``.ovr``, ``.aux.xml``, ``.msk``), so any other name is a 404. There is deliberately
#: no route without it: GDAL lists the "directory" of a file it opens, and ``.../assets/{a}/``
#: must be a 404, not a redirect to the whole file.
STREAM_PATH = "/stream/collections/{collection_id}/items/{item_id}/assets/{asset_id}/{filename}"
_MEDIA_EXTENSIONS = {
    "image/tiff": ".tif",
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "application/xml": ".xml",
}


def stream_filename(item_id: str, asset_id: str, href: str, media_type: str | None = None) -> str:
    """The file name in an asset's stream link: ``<item>_<asset><extension of the stored file>``."""
    path = href.split("?", 1)[0].split("#", 1)[0]
    ext = os.path.splitext(path.rsplit("/", 1)[-1])[1]
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,6}", ext):
        ext = _MEDIA_EXTENSIONS.get((media_type or "").split(";", 1)[0].strip(), "")
    return f"{item_id}_{asset_id}{ext}"


#: scope key of the deadline holder (`tiler.deadline`): a started stream is not cut at the deadline
OPEN_ENDED = "open_ended"

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
#: request headers passed to the storage (conditional requests); Range is checked first
_FORWARDED = ("if-none-match", "if-modified-since", "if-range", "if-match", "if-unmodified-since")
#: storage answer headers passed to the client
_RELAYED = ("content-length", "content-range", "accept-ranges", "etag", "last-modified", "content-type")


class RangeNotAccepted(Exception):
    """A Range header this server does not serve (several ranges, bad syntax)."""


def check_range(value: str | None) -> str | None:
    """The Range header to forward: one ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` range.

    Raises:
        RangeNotAccepted: several ranges, another unit, or a range whose end precedes its start.

    """
    if value is None:
        return None
    text = value.strip().replace(" ", "")
    m = _RANGE.match(text)
    if m is None:
        raise RangeNotAccepted(
            "Range must be one byte range: bytes=START-END, bytes=START- or bytes=-LENGTH "
            "(several ranges in one request are not served)"
        )
    start, end = m.groups()
    if not start and not end:
        raise RangeNotAccepted("Range bytes=- names no byte")
    if start and end and int(end) < int(start):
        raise RangeNotAccepted("Range end precedes its start")
    if not start and int(end) == 0:
        raise RangeNotAccepted("Range bytes=-0 names no byte")
    return text


class StreamLimiter:
    """Open streams per caller and per worker (a thread-safe counter; no queue)."""

    def __init__(self, per_user: int, total: int):
        """Caps: ``per_user`` streams of one caller, ``total`` of the worker."""
        self.per_user, self.total = per_user, total
        self._by_user: dict[str, int] = {}
        self._open = 0
        self._lock = threading.Lock()

    def acquire(self, who: str) -> str | None:
        """Take a slot for ``who``; the refusal reason (``user``, ``total``) when there is none."""
        with self._lock:
            if self._open >= self.total:
                return "total"
            if self._by_user.get(who, 0) >= self.per_user:
                return "user"
            self._open += 1
            self._by_user[who] = self._by_user.get(who, 0) + 1
        metrics.STREAMS_IN_FLIGHT.inc()
        return None

    def release(self, who: str) -> None:
        """Give the slot back."""
        with self._lock:
            self._open -= 1
            left = self._by_user.get(who, 1) - 1
            if left > 0:
                self._by_user[who] = left
            else:
                self._by_user.pop(who, None)
        metrics.STREAMS_IN_FLIGHT.dec()

    def open_streams(self, who: str | None = None) -> int:
        """Streams open now (of ``who``, or of the worker)."""
        with self._lock:
            return self._open if who is None else self._by_user.get(who, 0)


class _Slot:
    """A limiter slot released exactly once (by the body's end or by the response's cleanup)."""

    def __init__(self, limiter: StreamLimiter, who: str):
        self.limiter, self.who, self._held = limiter, who, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.limiter.release(self.who)


class UpstreamClient:
    """The HTTP client that reads asset files from their storage (one per application)."""

    def __init__(self, settings: StreamSettings):
        """Timeouts and pool size from ``settings``; never follows redirects, ignores proxy variables."""
        self.settings = settings
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The shared client, made on first use (in the event loop that serves requests)."""
        if self._client is None:
            s = self.settings
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(s.read_timeout, connect=s.connect_timeout, pool=s.connect_timeout),
                limits=httpx.Limits(max_connections=s.max_total, max_keepalive_connections=32),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connections (application shutdown)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def sign(self, href: str, label: str, refresh: bool = False) -> str:
        """``href`` as the storage wants it: signed by its prefix's signer, if any.

        Raises:
            UpstreamFailed: the signer gave no HTTP(S) URL (the message names the asset
                ``label``, never the signed URL).

        """
        signer = signer_for(href)
        if signer is None:
            return href
        url = await run_in_threadpool(lambda: signer(href, refresh=refresh))
        if not url.startswith(("http://", "https://")):
            raise UpstreamFailed(f"The signer of asset {label} did not give an HTTP URL.")
        return url

    async def open(self, href: str, headers: dict[str, str], label: str) -> httpx.Response:
        """Send the GET and return the storage's answer with its body not read yet.

        One re-sign and retry on 401/403 (when a signer is configured), one retry on 5xx,
        429 or a connection failure; then the failure as an `UpstreamError`.
        """
        if not href.startswith(("http://", "https://")) and signer_for(href) is None:
            raise UpstreamFailed(
                f"Asset {label} is not on an HTTP storage and no signer makes it one; it cannot be streamed."
            )
        url = await self.sign(href, label)
        # identity: the bytes relayed are the file's, whatever the storage could compress
        send_headers = {**headers, "accept-encoding": "identity", **headers_for(href)}
        resigned = retried = False
        while True:
            try:
                request = self.client.build_request("GET", url, headers=send_headers)
                response = await self.client.send(request, stream=True)
            except httpx.TimeoutException as e:
                if not retried:
                    retried = True
                    continue
                raise UpstreamTimeout(
                    f"The storage host did not answer in time for asset {label}.", label
                ) from e
            except httpx.HTTPError as e:
                if not retried:
                    retried = True
                    await asyncio.sleep(0.2)
                    continue
                raise UpstreamFailed(
                    f"Could not read asset {label} from its storage host: the connection failed.", label
                ) from e
            code = response.status_code
            if code < 300 or code in (304, 416):
                return response
            await response.aclose()
            if code in (401, 403) and not resigned and signer_for(href) is not None:
                resigned = True
                logger.info("storage refused a signed href while streaming; signing it again")
                url = await self.sign(href, label, refresh=True)
                continue
            if (code >= 500 or code == 429) and not retried:
                retried = True
                await asyncio.sleep(0.2)
                continue
            raise _status_error(code, label)


def _status_error(code: int, label: str) -> UpstreamError:
    if code in (404, 410):
        return UpstreamNotFound(f"Asset {label} was not found on its storage host.", label, code)
    if code in (401, 403):
        return UpstreamRefused(
            f"The storage host refused the server's credentials for asset {label} (HTTP {code}).", label, code
        )
    if code in (429, 503):
        return UpstreamUnavailable(
            f"The storage host is unavailable for asset {label} (HTTP {code}, retried); retry later.",
            label,
            code,
        )
    if 300 <= code < 400:
        return UpstreamFailed(
            f"The storage host answered a redirect for asset {label}; redirects are not followed.",
            label,
            code,
        )
    return UpstreamFailed(f"Could not read asset {label} from its storage host: HTTP {code}.", label, code)


class IdentityEncoding:
    """Remove ``Accept-Encoding`` from requests under ``prefix`` before the compression middleware.

    A byte range of a file must reach GDAL as the file's bytes; the compression middleware
    would compress any body whose media type it does not know (a COG's is not always
    ``image/tiff``).
    """

    def __init__(self, app: Any, prefix: str = "/stream/collections/"):
        """Wrap ``app``."""
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Strip the header on matching paths."""
        if scope["type"] == "http" and self.prefix in scope.get("path", ""):
            # in place: the outer middleware (metrics, access log) reads the route FastAPI sets in it
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        await self.app(scope, receive, send)


def _relayed_headers(upstream: httpx.Response) -> dict[str, str]:
    out = {k: upstream.headers[k] for k in _RELAYED if k in upstream.headers}
    out.setdefault("accept-ranges", "bytes")
    return out


def _who(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    user = getattr(principal, "user", None)
    return f"user:{user}" if user else f"ip:{request.client.host if request.client else '-'}"


def stream_router(settings: StreamSettings) -> APIRouter:
    """The ``/stream/...`` route (GET and HEAD)."""
    router = APIRouter(tags=["Raw COG streaming"], dependencies=[STREAM.depends()])

    @router.api_route(
        STREAM_PATH,
        methods=["GET", "HEAD"],
        summary="The asset's file, streamed from its storage (Range requests: GDAL /vsicurl/, QGIS, rasterio).",
        response_class=Response,
        responses={
            200: {"content": {"image/tiff; application=geotiff": {}}, "description": "The whole file."},
            206: {"description": "The requested byte range (`Content-Range`)."},
            304: {"description": "Not modified (`If-None-Match` / `If-Modified-Since`)."},
            416: {"description": "Range not satisfiable, or several ranges asked at once."},
            429: {"description": "Too many streams open for this caller; retry after `Retry-After`."},
        },
    )
    async def stream_asset(
        request: Request,
        collection_id: Annotated[str, Path(description="STAC Collection Identifier")],
        item_id: Annotated[str, Path(description="STAC Item Identifier")],
        asset_id: Annotated[str, Path(description="STAC Asset Identifier")],
        filename: Annotated[
            str, Path(description="Any file name (the STAC API's links use `<item>_<asset>.tif`).")
        ],
        range_: Annotated[str | None, Header(alias="range", description="One byte range.")] = None,
    ) -> Response:
        try:
            wanted = check_range(range_)
        except RangeNotAccepted as e:
            return JSONResponse({"detail": str(e)}, status_code=416, headers={"Accept-Ranges": "bytes"})
        upstream_client: UpstreamClient = request.app.state.stream_upstream
        limiter: StreamLimiter = request.app.state.stream_limiter
        asset = await run_in_threadpool(
            request.app.state.catalogue.asset, collection_id, item_id, asset_id, cached=True
        )
        href = asset.href
        expected = stream_filename(item_id, asset_id, href, asset.media_type)
        if filename != expected:
            # one file per asset: GDAL probes siblings (`.ovr`, `.aux.xml`, `.msk`) by name, and
            # must not find the same TIFF under each of them
            raise HTTPException(404, f"Asset {item_id}/{asset_id} has one file, named {expected!r}")
        label = f"{item_id}/{asset_id}"
        if redirects(href):
            # a presigning storage: the client reads the file from it, with a URL valid for
            # minutes (GDAL reuses it for every range until it expires, then asks here again)
            url = await upstream_client.sign(href, label)
            metrics.STREAM_REDIRECTS.labels(collection_id).inc()
            return Response(
                status_code=307,
                headers={"location": url, "cache-control": "private, no-store", "accept-ranges": "bytes"},
            )
        who = _who(request)
        refused = limiter.acquire(who)
        if refused is not None:
            metrics.STREAM_REFUSED.labels(refused).inc()
            what = "this caller" if refused == "user" else "this server"
            raise HTTPException(
                429, f"Too many streams open for {what}; retry shortly.", headers={"Retry-After": "1"}
            )
        slot = _Slot(limiter, who)
        head = request.method == "HEAD"
        send = {k: request.headers[k] for k in _FORWARDED if k in request.headers}
        if head:
            send["range"] = "bytes=0-0"  # sizes from Content-Range: works where HEAD is not signed (S3)
        elif wanted:
            send["range"] = wanted
        try:
            upstream = await upstream_client.open(href, send, label)
        except BaseException:
            slot.release()
            raise
        headers = _relayed_headers(upstream)
        headers["cache-control"] = "private, max-age=0"
        if head:
            await upstream.aclose()
            slot.release()
            size = _total_size(upstream)
            headers.pop("content-range", None)
            if size is not None:
                headers["content-length"] = str(size)
            status = upstream.status_code if upstream.status_code in (304, 416) else 200
            return Response(status_code=status, headers=headers)
        if upstream.status_code == 416:
            await upstream.aclose()
            slot.release()
            size = _total_size(upstream)
            body = {
                "detail": "Range not satisfiable"
                + (f": the file has {size} bytes" if size is not None else "")
            }
            return JSONResponse(
                body,
                status_code=416,
                headers={k: v for k, v in headers.items() if k in ("content-range", "accept-ranges")},
            )
        holder = request.scope.get("dinamis.deadline")
        if holder is not None:
            holder[OPEN_ENDED] = True
        return StreamingResponse(
            _relay(upstream, slot, label, collection_id, settings.chunk_bytes),
            status_code=upstream.status_code,
            headers=headers,
        )

    return router


def _total_size(upstream: httpx.Response) -> int | None:
    cr = upstream.headers.get("content-range", "")
    if "/" in cr:
        total = cr.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    if upstream.status_code == 200 and upstream.headers.get("content-length", "").isdigit():
        return int(upstream.headers["content-length"])
    return None


async def _relay(
    upstream: httpx.Response, slot: _Slot, label: str, collection_id: str, chunk: int
) -> AsyncIterator[bytes]:
    sent = 0
    try:
        async for data in upstream.aiter_raw(chunk):
            sent += len(data)
            yield data
    except httpx.HTTPError as e:
        logger.warning(
            "stream of asset %s cut by the storage host after %d bytes (%s)", label, sent, type(e).__name__
        )
        raise
    finally:
        metrics.STREAM_BYTES.labels(collection_id).inc(sent)
        await upstream.aclose()
        slot.release()
