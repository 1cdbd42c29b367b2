"""Readiness: is the COG storage reachable? (the database half is in `tiler.db`).

``/readyz`` asks a `StorageProbe` for the state of each URL in
``TILER_API_READINESS_PROBE_URLS``. A probe is a 1-byte range GET with a short
timeout, redirects not followed, sent **without credentials**: the upstream
credentials (`tiler.upstream`) live only inside GDAL as path-specific options
and are never handed to another HTTP client, and s3:// options would need
request signing. So "reachable" means "the storage answered": any status below
500 counts, 401/403/404 included; a refused or timed-out connection, a DNS or
TLS failure, or a 5xx answer does not. Results are kept ``ttl`` seconds, so
probes from load balancers and kubelets stay cheap whatever their rate.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tiler.urls import display_url, no_redirect_opener

logger = logging.getLogger(__name__)


_opener = no_redirect_opener()  # the environment's proxies, as before


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of probing one URL."""

    url: str
    ok: bool
    status: int | None = None
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-friendly form (the URL already stripped of secrets)."""
        out: dict = {"url": self.url, "reachable": self.ok, "seconds": round(self.seconds, 3)}
        if self.status is not None:
            out["status"] = self.status
        if self.error is not None:
            out["error"] = self.error
        return out


def probe(url: str, timeout: float) -> ProbeResult:
    """Ask ``url`` for its first byte; reachable when the host answers below 500."""
    t0 = time.monotonic()
    shown = display_url(url)
    req = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "dinamis-tiler-readyz"})
    try:
        with _opener.open(req, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
        e.close()
    except TimeoutError:
        return ProbeResult(shown, False, error="timeout", seconds=time.monotonic() - t0)
    except urllib.error.URLError as e:
        reason = e.reason
        name = "timeout" if isinstance(reason, TimeoutError) else type(reason).__name__
        return ProbeResult(shown, False, error=name, seconds=time.monotonic() - t0)
    except (OSError, http.client.HTTPException) as e:
        return ProbeResult(shown, False, error=type(e).__name__, seconds=time.monotonic() - t0)
    return ProbeResult(shown, status < 500, status=status, seconds=time.monotonic() - t0)


class StorageProbe:
    """Probe the storage URLs, at most once per ``ttl`` seconds (thread-safe)."""

    def __init__(self, urls: list[str], timeout: float = 2.0, ttl: float = 5.0):
        """``urls``: http(s) URLs on the COG storage (validated by the settings)."""
        self.urls = list(urls)
        self.timeout = timeout
        self.ttl = ttl
        self._lock = threading.Lock()
        self._results: list[ProbeResult] = []
        self._at = float("-inf")
        self._down: set[str] = set()

    def check(self) -> list[ProbeResult]:
        """Results no older than ``ttl``; concurrent callers share one round of probes."""
        if not self.urls:
            return []
        with self._lock:
            if time.monotonic() - self._at >= self.ttl:
                if len(self.urls) == 1:
                    self._results = [probe(self.urls[0], self.timeout)]
                else:
                    with ThreadPoolExecutor(max_workers=min(8, len(self.urls))) as pool:
                        self._results = list(pool.map(lambda u: probe(u, self.timeout), self.urls))
                self._at = time.monotonic()
                for r in self._results:
                    if not r.ok and r.url not in self._down:
                        logger.warning("COG storage unreachable: %s (%s)", r.url, r.error or r.status)
                    elif r.ok and r.url in self._down:
                        logger.info("COG storage reachable again: %s", r.url)
                self._down = {r.url for r in self._results if not r.ok}
            return list(self._results)
