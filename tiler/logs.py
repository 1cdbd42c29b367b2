"""Logging set-up: one configuration, secrets in URLs redacted, text or JSON lines.

Every record logged while a request is served carries its request id
(`REQUEST_ID`, set by `tiler.metrics.ObservabilityMiddleware`); the access line
of a request carries its fields in ``record.fields``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from contextvars import ContextVar
from typing import Any

#: Id of the request being served (contextvars follow it into the threadpool).
REQUEST_ID: ContextVar[str | None] = ContextVar("tiler_request_id", default=None)

_SECRET = re.compile(
    r"(?P<k>(?:token|access_token|password|signature|x-amz-signature|x-amz-credential|sig|key)=)[^&\s\"']+",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?P<s>\w+://)[^/@\s:]+:[^/@\s]+@")
_PATH_TOKEN = re.compile(r"/t/[^/\s?\"']+")
_BEARER = re.compile(r"(?P<k>(?:bearer|apikey)\s+)[^\s\"',]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide tokens, passwords and credentials in query strings and URLs.

    Each pattern runs only when its literal part is in ``text`` (most log lines
    have none, and this runs on every record).
    """
    if "=" in text:
        text = _SECRET.sub(r"\g<k>***", text)
    if "/t/" in text:
        text = _PATH_TOKEN.sub("/t/***", text)
    low = text.lower()
    if "bearer" in low or "apikey" in low:
        text = _BEARER.sub(r"\g<k>***", text)
    if "@" in text:
        text = _USERINFO.sub(r"\g<s>***@", text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrite each record's message with secrets redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the formatted message (args included)."""
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


#: Libraries that log URLs they read (GDAL's retry warnings carry the full URL, query string included).
LIBRARY_LOGGERS = (
    "rasterio",
    "rasterio._env",
    "rasterio._err",
    "rasterio._io",
    "rasterio._base",
    "rio-tiler",
    "httpx",  # the raw streaming client logs each storage request's URL at INFO
    "httpcore",
    "stac_fastapi",
)


def redact_library_logs() -> None:
    """Redact records at the source for `LIBRARY_LOGGERS`, whatever handlers are installed."""
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(RedactingFilter())


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being served, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Add ``record.request_id``."""
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, access fields, error."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialize ``record`` (message and traceback redacted)."""
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),  # redacted by RedactingFilter
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [request id]`` lines."""

    def __init__(self) -> None:
        """The classic layout."""
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Append the request id when there is one; redact tracebacks."""
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid:
            first, sep, rest = text.partition("\n")
            text = f"{first} [{rid}]{sep}{rest}"
        return redact(text)


def log_handler(fmt: str = "text", stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) in format ``fmt``, redacting, stamping request ids."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str = "INFO", fmt: str = "text", if_unconfigured: bool = False) -> None:
    """Configure root logging once, with the redacting filter on every handler.

    ``fmt`` is ``text`` or ``json``. With ``if_unconfigured``, do nothing when the
    root logger already has handlers (someone else configured logging).
    """
    root = logging.getLogger()
    if if_unconfigured and root.handlers:
        return
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # tiler.access (one line per request, with its id) replaces uvicorn's access line
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("rio-tiler").setLevel(logging.ERROR)
    # titiler's and rio-tiler's per-tile INFO lines ("opening data with reader", "found 2 assets"):
    # one to three log lines per tile, without anything tiler.http's line does not say
    for name in ("titiler", "rio_tiler"):
        logging.getLogger(name).setLevel(logging.WARNING)
