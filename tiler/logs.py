"""Logging set-up: one configuration, secrets in URLs redacted."""

from __future__ import annotations

import logging
import re

_SECRET = re.compile(
    r"(?P<k>(?:token|access_token|password|signature|x-amz-signature|x-amz-credential|sig|key)=)[^&\s\"']+",
    re.IGNORECASE,
)
_USERINFO = re.compile(r"(?P<s>\w+://)[^/@\s:]+:[^/@\s]+@")
_PATH_TOKEN = re.compile(r"/t/[^/\s?\"']+")
_BEARER = re.compile(r"(?P<k>(?:bearer|apikey)\s+)[^\s\"',]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide tokens, passwords and credentials in query strings and URLs."""
    text = _SECRET.sub(r"\g<k>***", text)
    text = _PATH_TOKEN.sub("/t/***", text)
    text = _BEARER.sub(r"\g<k>***", text)
    return _USERINFO.sub(r"\g<s>***@", text)


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
LIBRARY_LOGGERS = ("rasterio", "rasterio._env", "rasterio._err", "rasterio._io", "rasterio._base", "rio-tiler")


def redact_library_logs() -> None:
    """Redact records at the source for `LIBRARY_LOGGERS`, whatever handlers are installed."""
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(RedactingFilter())


def configure_logging(level: str = "INFO") -> None:
    """Configure root logging once, with the redacting filter on every handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("rio-tiler").setLevel(logging.ERROR)
