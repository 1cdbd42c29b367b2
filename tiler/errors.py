"""Our exceptions and the status-code table shared by every route."""

from __future__ import annotations

import logging
import re

import psycopg
from fastapi import FastAPI
from psycopg import OperationalError
from psycopg_pool import PoolTimeout
from rasterio._err import CPLE_BaseError
from rasterio.errors import RasterioIOError
from rio_tiler.errors import PointOutsideBounds
from starlette import status
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.responses import JSONResponse
from titiler.core.errors import DEFAULT_STATUS_CODES, TilerError, add_exception_handlers
from titiler.mosaic.errors import MOSAIC_STATUS_CODES
from titiler.pgstac.errors import PGSTAC_STATUS_CODES, BackendError

logger = logging.getLogger(__name__)


class DatasetURLNotAllowed(TilerError):
    """A `url=` that is not in the allow-list or points at a forbidden place."""


class InvalidDatasetURL(TilerError):
    """A `url=` that cannot be a remote COG (bad scheme, local path, VSI prefix...)."""


class InvalidExternalItem(TilerError):
    """An ``/external`` ``url=`` whose answer is not a usable STAC item (not JSON, too large, no assets)."""


class AssetNotFound(TilerError):
    """The item has no asset of that name."""


class InvalidPansharpenParameters(TilerError):
    """Pansharpening weights, shapes or options that cannot be used."""


class InvalidPreset(TilerError):
    """A preset (built-in or STAC render) that cannot be used for this data or request."""


class PresetNotFound(InvalidPreset):
    """``preset=`` names no preset of this collection or item."""


class InvalidComparison(TilerError):
    """Two dates that cannot be compared (no overlap, different bands) or a request a comparison cannot serve."""


class LimitExceeded(TilerError):
    """A size, expression or filter over one of the server's caps (``TILER_LIMIT_*``)."""


class InvalidFilter(TilerError):
    """A CQL2 filter the server will not send to the catalogue (e.g. a malformed property name)."""


class InvalidExportParameters(TilerError):
    """An AOI export (`tiler.export`) that cannot be made: unknown band, CRS or grid, box outside the item."""


class ExportTooLarge(LimitExceeded):
    """An AOI export over the server's cap for a direct answer (or for a job): 400, never a downsample."""


class JobNotFound(TilerError):
    """No export job of that id for this caller (unknown, expired, or someone else's)."""


class TooManyJobs(TilerError):
    """The caller already has the most queued or running export jobs a user may have (429)."""


# --------------------------------------------------------------------------- deadlines, upstream faults


class DeadlineExceeded(TilerError):
    """The request ran past ``TILER_API_REQUEST_TIMEOUT`` (504)."""


class RequestCancelled(TilerError):
    """The client went away; the render stops (nobody reads the answer)."""


class UpstreamError(TilerError):
    """A COG host failed; ``asset`` names the file (never its query string or credentials)."""

    def __init__(self, message: str, asset: str = "", upstream_status: int | None = None):
        """Keep the asset label and the host's HTTP status for logs and the status table."""
        super().__init__(message)
        self.asset = asset
        self.upstream_status = upstream_status


class UpstreamNotFound(UpstreamError):
    """The host says the file does not exist (404/410)."""


class UpstreamRefused(UpstreamError):
    """The host refused the server's credentials (401/403)."""


class UpstreamUnavailable(UpstreamError):
    """The host stayed busy or unavailable (429/503) after GDAL's retries."""


class UpstreamTimeout(UpstreamError):
    """The host did not answer within GDAL's HTTP timeouts."""


class UpstreamFailed(UpstreamError):
    """Any other storage failure: 5xx, connection reset or closed mid-body, corrupt data."""


STATUS_CODES: dict[type[Exception], int] = {
    **DEFAULT_STATUS_CODES,
    **MOSAIC_STATUS_CODES,
    **PGSTAC_STATUS_CODES,
    DatasetURLNotAllowed: status.HTTP_403_FORBIDDEN,
    InvalidDatasetURL: status.HTTP_400_BAD_REQUEST,
    InvalidExternalItem: status.HTTP_400_BAD_REQUEST,
    AssetNotFound: status.HTTP_404_NOT_FOUND,
    InvalidPansharpenParameters: status.HTTP_400_BAD_REQUEST,
    InvalidPreset: status.HTTP_400_BAD_REQUEST,
    InvalidComparison: status.HTTP_400_BAD_REQUEST,
    DeadlineExceeded: status.HTTP_504_GATEWAY_TIMEOUT,
    RequestCancelled: 499,  # nginx's "client closed request": never seen by the client
    UpstreamNotFound: status.HTTP_404_NOT_FOUND,
    UpstreamRefused: status.HTTP_502_BAD_GATEWAY,
    UpstreamUnavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    UpstreamTimeout: status.HTTP_504_GATEWAY_TIMEOUT,
    UpstreamFailed: status.HTTP_502_BAD_GATEWAY,
    LimitExceeded: status.HTTP_400_BAD_REQUEST,
    PointOutsideBounds: status.HTTP_404_NOT_FOUND,
    InvalidFilter: status.HTTP_400_BAD_REQUEST,
    InvalidExportParameters: status.HTTP_400_BAD_REQUEST,
    ExportTooLarge: status.HTTP_400_BAD_REQUEST,
    JobNotFound: status.HTTP_404_NOT_FOUND,
    TooManyJobs: status.HTTP_429_TOO_MANY_REQUESTS,
}

UPSTREAM_ERRORS = (UpstreamNotFound, UpstreamRefused, UpstreamUnavailable, UpstreamTimeout, UpstreamFailed)

#: Retry-After (seconds) sent with these statuses.
RETRY_AFTER = {status.HTTP_503_SERVICE_UNAVAILABLE: "5", status.HTTP_504_GATEWAY_TIMEOUT: "5"}

#: Database errors a caller's search can cause (pgstac raises them on bad filters, unknown
#: operators or properties, out-of-range limits): 400, with a generic message.
CALLER_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    psycopg.errors.DataError,
    psycopg.errors.ProgrammingError,
    psycopg.errors.RaiseException,
    psycopg.errors.IntegrityError,
    psycopg.errors.NotSupportedError,
    BackendError,
)

#: errors in the class of a caller's bad search that are the server's fault: missing privilege,
#: table or schema (a role without `tiler migrate --grant-reader`): 500, and alerting sees them
SERVER_SQLSTATES = frozenset({"42501", "42P01", "3F000"})

_URL = re.compile(r"(?:https?|s3|gs|az)://[^\s'\"]+|/vsi\w+/[^\s'\"]+", re.IGNORECASE)


def shorten_urls(text: str) -> str:
    """Replace URLs (which may carry signed query strings) by their scheme and host."""

    def _short(m: re.Match) -> str:
        url = m.group(0)
        if url.lower().startswith("/vsi"):
            return "<dataset>"
        head = url.split("?", 1)[0].split("#", 1)[0]
        scheme, _, rest = head.partition("://")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        name = rest.rsplit("/", 1)[-1] if "/" in rest else ""
        return f"{scheme}://{host}/…/{name}" if name else f"{scheme}://{host}"

    return _URL.sub(_short, text)


_HTTP_CODE = re.compile(r"HTTP (?:response|error) code:? (\d{3})")
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_MISSING = re.compile(r"does not exist in the file system|No such file", re.IGNORECASE)


def file_label(href: str) -> str:
    """The file name of an href, without query string, fragment or host."""
    path = href.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return path.rsplit("/", 1)[-1] or "<dataset>"


def classify_upstream(exc: BaseException, asset: str | None = None) -> UpstreamError:
    """Our `UpstreamError` for a GDAL/rasterio read failure, by the HTTP status or curl error in it.

    ``asset`` names what was read (``item/asset (file.tif)``); messages never carry URLs.
    """
    text = str(exc)
    m = _HTTP_CODE.search(text)
    code = int(m.group(1)) if m else None
    what = f"asset {asset}" if asset else "the imagery"
    if code in (404, 410) or (code is None and _MISSING.search(text)):
        return UpstreamNotFound(
            f"{what[0].upper()}{what[1:]} was not found on its storage host.", asset or "", code
        )
    if code in (401, 403):
        return UpstreamRefused(
            f"The storage host refused the server's credentials for {what} (HTTP {code}).", asset or "", code
        )
    if code in (429, 503):
        return UpstreamUnavailable(
            f"The storage host is unavailable for {what} (HTTP {code}, retried); retry later.",
            asset or "",
            code,
        )
    if code is None and _TIMED_OUT.search(text):
        return UpstreamTimeout(f"The storage host did not answer in time for {what}.", asset or "", None)
    if code and code >= 300:
        reason = f"HTTP {code}"
    elif text.startswith("Read failed"):
        reason = "the transfer failed or was cut short"
    else:
        reason = shorten_urls(text.splitlines()[0] if text else "")[:200]
    return UpstreamFailed(f"Could not read {what} from its storage host: {reason}", asset or "", code)


def _upstream_error(request: Request, exc: Exception) -> JSONResponse:
    """A read failure no reader classified (e.g. a COG by URL): classified here, never a 500."""
    return _fault(request, classify_upstream(exc))


def _fault(request: Request, exc: Exception) -> JSONResponse:
    """Deadlines and classified upstream failures: status from the table, Retry-After when transient."""
    code = STATUS_CODES[type(exc)]
    if isinstance(exc, UpstreamError):
        logger.warning(
            "upstream %s on %s: %s",
            exc.upstream_status or type(exc).__name__,
            get_route_path(request.scope),
            exc,
        )
    headers = {"Retry-After": RETRY_AFTER[code]} if code in RETRY_AFTER else None
    return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """The catalogue database is unreachable or saturated (503, retry later)."""
    logger.error("database unavailable on %s: %s", get_route_path(request.scope), type(exc).__name__)
    return JSONResponse(
        {"detail": "The catalogue database is unavailable, retry later."},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


def _database_detail(exc: Exception) -> str:
    """What the log may say about a database error: class, SQLSTATE and the first line only."""
    cause = exc.__cause__ if isinstance(exc, BackendError) and exc.__cause__ is not None else exc
    sqlstate = getattr(cause, "sqlstate", None) or "-"
    first = (str(cause).splitlines() or [""])[0][:200]
    return f"{type(cause).__name__} [{sqlstate}] {shorten_urls(first)}"


def _refused_query(request: Request, exc: Exception) -> JSONResponse:
    """The catalogue refused the caller's search: 400 without the database's message or context."""
    if getattr(exc, "sqlstate", None) in SERVER_SQLSTATES:
        return _failed_query(request, exc)  # our grants or schema, not the caller's search
    logger.warning(
        "catalogue refused a query on %s: %s", get_route_path(request.scope), _database_detail(exc)
    )
    return JSONResponse(
        {
            "detail": "The catalogue could not run this search: check the filter "
            "(operators, property names, values) and the search parameters."
        },
        status_code=status.HTTP_400_BAD_REQUEST,
    )


def _failed_query(request: Request, exc: Exception) -> JSONResponse:
    """Any other database error: 500 without the database's message."""
    logger.error("catalogue query failed on %s: %s", get_route_path(request.scope), _database_detail(exc))
    return JSONResponse(
        {"detail": "The catalogue query failed."}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
    )


_FILL_VALUE = re.compile(r"^Cannot convert fill_value (\S+) to dtype (\w+)")


def _type_error(request: Request, exc: Exception) -> JSONResponse:
    """A ``nodata`` the band's type cannot hold (``inf`` on uint16) is the caller's 400.

    Any other TypeError is a bug: 500, as titiler's catch-all answers it.
    """
    if m := _FILL_VALUE.match(str(exc)):
        return JSONResponse(
            {"detail": f"`nodata` {m.group(1)} cannot be represented in the data type ({m.group(2)})"},
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    logger.error("unhandled error on %s", get_route_path(request.scope), exc_info=exc)
    return JSONResponse(
        {"detail": "Internal Server Error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
    )


def _gdal_error(request: Request, exc: Exception) -> JSONResponse:
    """GDAL/PROJ errors: PROJ refusing coordinates is the caller's 400; the rest a 500 without paths."""
    text = str(exc)
    if text.startswith("PROJ:"):
        return JSONResponse(
            {"detail": f"Coordinates cannot be transformed: {text[5:].strip()[:200]}"},
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    logger.error("GDAL error on %s: %s", get_route_path(request.scope), shorten_urls(text))
    return JSONResponse(
        {"detail": f"Could not process the imagery: {shorten_urls(text)[:300]}"},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


def _index_error(request: Request, exc: Exception) -> JSONResponse:
    """A "band index N out of range" (rasterio) is the caller's 400; any other IndexError a 500."""
    text = str(exc)
    if text.startswith("band index"):
        return JSONResponse({"detail": f"`bidx`: {text}"}, status_code=status.HTTP_400_BAD_REQUEST)
    logger.error("unhandled error on %s", get_route_path(request.scope), exc_info=exc)
    return JSONResponse(
        {"detail": "Internal Server Error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
    )


def register_error_handlers(app: FastAPI) -> None:
    """Install the status table, then our handlers for upstream and database faults."""
    add_exception_handlers(app, STATUS_CODES)
    app.add_exception_handler(psycopg.Error, _failed_query)
    for exc in CALLER_DATABASE_ERRORS:
        app.add_exception_handler(exc, _refused_query)
    app.add_exception_handler(RasterioIOError, _upstream_error)
    for exc in (DeadlineExceeded, RequestCancelled, *UPSTREAM_ERRORS):
        app.add_exception_handler(exc, _fault)
    app.add_exception_handler(TypeError, _type_error)
    app.add_exception_handler(IndexError, _index_error)
    app.add_exception_handler(CPLE_BaseError, _gdal_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
