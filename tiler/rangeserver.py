"""A small static file server that honours HTTP ``Range`` (one range, or several as nginx does).

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

_SPEC = re.compile(r"^(\d*)-(\d*)$")
#: ranges in one request at most (more: 416)
MAX_RANGES = 64
_BOUNDARY = "00000000000000000001"  # nginx numbers its boundaries too


def _ranges(value: str, size: int) -> list[tuple[int, int]] | None:
    """The satisfiable ``(first, last)`` byte ranges of a ``Range`` value; None when malformed."""
    if not value.startswith("bytes="):
        return None
    specs = value[len("bytes=") :].split(",")
    if len(specs) > MAX_RANGES:
        return None
    out = []
    for spec in specs:
        m = _SPEC.match(spec.strip())
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix range: last N bytes
            start, end = max(size - int(m.group(2)), 0), size - 1
        if start < size and start <= end:
            out.append((start, end))
    return out


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """Serve files below ``directory`` with byte ranges (several: ``multipart/byteranges``)."""

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
        content_type = "image/tiff" if path.suffix in (".tif", ".tiff") else self.guess_type(str(path))
        rng = self.headers.get("Range")
        if rng:
            ranges = _ranges(rng.strip(), size)
            if ranges is None:
                self.send_error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                return
            if not ranges:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if len(ranges) > 1:
                self._serve_parts(path, ranges, size, content_type, body)
                return
            (start, end), status = ranges[0], HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.send_header("Last-Modified", formatdate(stat.st_mtime, usegmt=True))
        self.send_header("ETag", etag)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            self._copy(path, [(start, end)], [b""], b"")

    def _serve_parts(
        self, path: Path, ranges: list[tuple[int, int]], size: int, content_type: str, body: bool
    ) -> None:
        """206 ``multipart/byteranges``: one part per range, in the order asked."""
        heads = [
            f"\r\n--{_BOUNDARY}\r\nContent-Type: {content_type}\r\nContent-Range: bytes {a}-{b}/{size}\r\n\r\n".encode()
            for a, b in ranges
        ]
        tail = f"\r\n--{_BOUNDARY}--\r\n".encode()
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", f"multipart/byteranges; boundary={_BOUNDARY}")
        self.send_header("Accept-Ranges", "bytes")
        length = sum(len(h) for h in heads) + sum(b - a + 1 for a, b in ranges) + len(tail)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if body:
            self._copy(path, ranges, heads, tail)

    def _copy(self, path: Path, ranges: list[tuple[int, int]], heads: list[bytes], tail: bytes) -> None:
        """Write each range of the file after its head, then ``tail``."""
        with path.open("rb") as f:
            for (start, end), head in zip(ranges, heads, strict=True):
                self.wfile.write(head)
                f.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        return
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            self.wfile.write(tail)


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
