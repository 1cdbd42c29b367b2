"""A Range server on 127.0.0.1 that misbehaves on purpose, by the first path segment.

``/ok/<file>`` serves the file; ``/403/``, ``/401/``, ``/404/``, ``/429/``, ``/500/``, ``/502/``,
``/504/`` answer that status;
``/flaky/`` answers 503 to the first ``flaky_failures`` requests for each file, then serves it
(``/flaky3/``: the first 3);
``/busy/`` always answers 503; ``/hang/`` accepts and never answers (until the server stops);
``/cut/`` sends the headers of a range after the first one and closes half-way through the body;
``/slow/`` serves every request after ``slow_delay`` seconds. Every request is recorded.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler


class FaultHandler(RangeRequestHandler):
    """Dispatch on the first path segment (see module docstring)."""

    server: FaultServer

    def _serve(self, body: bool) -> None:
        parts = urlsplit(self.path)
        mode, _, rest = parts.path.lstrip("/").partition("/")
        name = rest.rsplit("/", 1)[-1]  # /slow/<anything>/<file>: distinct URLs for one file
        with self.server.lock:
            self.server.seen.append((mode, rest, self.headers.get("Range"), time.monotonic()))
            count = self.server.counts[(mode, rest)] = self.server.counts.get((mode, rest), 0) + 1
        if mode in ("401", "403", "404"):
            self.send_error(int(mode))
            return
        if mode in ("429", "500", "502", "504"):
            self.send_response(int(mode))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        failures = int(mode[5:] or self.server.flaky_failures) if mode.startswith("flaky") else 0
        if mode == "busy" or count <= failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        if mode == "hang":
            self.server.stop.wait()
            return
        if mode == "slow":
            self.server.stop.wait(self.server.slow_delay)
        rng = self.headers.get("Range") or ""
        if mode == "cut" and body and rng and not rng.startswith("bytes=0-"):
            self._cut(name)
            return
        self.path = "/" + name
        super()._serve(body)

    def _cut(self, name: str) -> None:
        self.path = "/" + name
        path = self._resolve()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        self.send_response(206)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        rng = (self.headers.get("Range") or "bytes=0-").removeprefix("bytes=")
        start, _, end = rng.partition("-")
        start_i = int(start or 0)
        end_i = min(int(end), size - 1) if end else size - 1
        length = end_i - start_i + 1
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Range", f"bytes {start_i}-{end_i}/{size}")
        self.end_headers()
        with path.open("rb") as f:
            f.seek(start_i)
            self.wfile.write(f.read(max(length // 2, 1)))
        self.wfile.flush()
        self.close_connection = True


class FaultServer(RangeHTTPServer):
    """`RangeHTTPServer` with `FaultHandler` and its counters."""

    def __init__(self, directory, flaky_failures: int = 2, slow_delay: float = 0.5):
        """Serve ``directory`` on a free port of 127.0.0.1."""
        super().__init__(directory, handler_class=FaultHandler)
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, str | None, float]] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.flaky_failures = flaky_failures
        self.slow_delay = slow_delay
        self.stop = threading.Event()

    def requests(self, mode: str, name: str | None = None) -> list[tuple[str, str, str | None, float]]:
        """Recorded requests of one mode (and file name)."""
        with self.lock:
            return [s for s in self.seen if s[0] == mode and (name is None or s[1].endswith(name))]

    def shutdown(self) -> None:
        """Release hanging handlers, then stop."""
        self.stop.set()
        super().shutdown()
        self.server_close()
