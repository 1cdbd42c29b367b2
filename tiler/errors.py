"""Our exceptions and the status-code table shared by every route."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI
from psycopg import OperationalError
from psycopg_pool import PoolTimeout
from rasterio.errors import RasterioIOError
from starlette import status
from starlette.requests import Request
from starlette.responses import JSONResponse
from titiler.core.errors import DEFAULT_STATUS_CODES, TilerError, add_exception_handlers
from titiler.mosaic.errors import MOSAIC_STATUS_CODES
from titiler.pgstac.errors import PGSTAC_STATUS_CODES

logger = logging.getLogger(__name__)


class DatasetURLNotAllowed(TilerError):
    """A `url=` that is not in the allow-list or points at a forbidden place."""


class InvalidDatasetURL(TilerError):
    """A `url=` that cannot be a remote COG (bad scheme, local path, VSI prefix...)."""


class AssetNotFound(TilerError):
    """The item has no asset of that name."""


class InvalidPansharpenParameters(TilerError):
    """Pansharpening weights, shapes or options that cannot be used."""


class InvalidPreset(TilerError):
    """A preset (built-in or STAC render) that cannot be used for this data or request."""


class PresetNotFound(InvalidPreset):
    """``preset=`` names no preset of this collection or item."""


STATUS_CODES: dict[type[Exception], int] = {
    **DEFAULT_STATUS_CODES,
    **MOSAIC_STATUS_CODES,
    **PGSTAC_STATUS_CODES,
    DatasetURLNotAllowed: status.HTTP_403_FORBIDDEN,
    InvalidDatasetURL: status.HTTP_400_BAD_REQUEST,
    AssetNotFound: status.HTTP_404_NOT_FOUND,
    InvalidPansharpenParameters: status.HTTP_400_BAD_REQUEST,
    InvalidPreset: status.HTTP_400_BAD_REQUEST,
}

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


def _upstream_error(request: Request, exc: Exception) -> JSONResponse:
    """A COG could not be read: the storage side failed, not the caller (502)."""
    logger.warning("upstream read failed on %s: %s", request.url.path, shorten_urls(str(exc)))
    return JSONResponse(
        {"detail": f"Could not read the imagery: {shorten_urls(str(exc))}"},
        status_code=status.HTTP_502_BAD_GATEWAY,
    )


def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """The catalogue database is unreachable or saturated (503, retry later)."""
    logger.error("database unavailable on %s: %s", request.url.path, type(exc).__name__)
    return JSONResponse(
        {"detail": "The catalogue database is unavailable, retry later."},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )


def register_error_handlers(app: FastAPI) -> None:
    """Install the status table, then our handlers for upstream and database faults."""
    add_exception_handlers(app, STATUS_CODES)
    app.add_exception_handler(RasterioIOError, _upstream_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(PoolTimeout, _database_error)
