"""A small static file server that honours HTTP ``Range`` (single ranges).

It stands in for the object storage holding the COGs in the demo and in the
tests. Production deployments serve COGs from nginx, S3 or an HTTPS archive.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from email.utils import formatdate
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Serve files below ``directory`` with support for one byte range."""

    server: RangeHTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """Send access lines to the logger instead of stderr."""
        logger.debug("%s %s", self.address_string(), format % args)

    def _resolve(self) -> Path | None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return None
        return path

    def do_HEAD(self) -> None:  # noqa: N802
        """HEAD: headers only."""
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        """GET with optional Range."""
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self._resolve()
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{int(stat.st_mtime):x}-{size:x}"'  # as nginx makes them
        if etag in [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        start, end = 0, size - 1
        status = HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:  # suffix range: last N bytes
                start = max(size - int(m.group(2)), 0)
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1
        self.send_response(status)
        self.send_header(
            "Content-Type", "image/tiff" if path.suffix in (".tif", ".tiff") else self.guess_type(str(path))
        )
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.send_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
        self.send_header("ETag", etag)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with path.open("rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class RangeHTTPServer(ThreadingHTTPServer):
    """Threaded static server for a directory."""

    daemon_threads = True

    def __init__(
        self,
        directory: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        handler_class: type[RangeRequestHandler] = RangeRequestHandler,
    ):
        """Serve ``directory`` on ``host:port`` (port 0 picks a free one)."""
        self.directory = str(directory)

        def handler(*args, **kwargs):
            return handler_class(*args, directory=self.directory, **kwargs)

        super().__init__((host, port), handler)

    @property
    def url(self) -> str:
        """Base URL, without trailing slash."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve forever in a daemon thread."""
        t = threading.Thread(target=self.serve_forever, name="range-server", daemon=True)
        t.start()
        return t
