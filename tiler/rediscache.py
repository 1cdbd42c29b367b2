"""The shared tier of the rendered tile cache: one Redis for every worker and replica.

`RedisTileStore` is what `tiler.cache.TileCache` consults after its own memory. Keys are
``<prefix>:<format version>:<sha256 of cache_key>``; values are a small binary format
written here (never pickle: a Redis that someone else can write to must not lead to code
execution), see `encode`. Whatever comes back is checked (`decode`) and anything that is
not exactly what this module writes is a miss.

Redis is an optimisation, never a dependency: every call is bounded by a short socket
timeout without retries, a failure is counted, logged once per outage, and Redis is then
skipped for ``backoff`` seconds (one request probes it after that; the first success ends
the outage). The URL may carry a password: only ``scheme://host:port`` is ever logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from tiler import __version__
from tiler.cache import _SKIPPED, CachedResponse
from tiler.metrics import TILE_CACHE_SHARED_ERRORS

log = logging.getLogger(__name__)

MAGIC = b"DTC1"
#: magic, status, length of the JSON header list; then the JSON, then the body
_HEAD = struct.Struct(">4sHI")
#: part of every key: entries written by another format or release are not read
KEY_VERSION = f"v1-{__version__}"
_MAX_HEADERS_BYTES = 16 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_PER_REQUEST = {name.decode() for name in _SKIPPED}


def encode(entry: CachedResponse) -> bytes:
    """``DTC1``, status (2 bytes), length of the headers (4 bytes), headers as JSON ``[[name, value], ...]``, body."""
    headers = json.dumps([[k.decode("latin-1"), v.decode("latin-1")] for k, v in entry.headers]).encode()
    return _HEAD.pack(MAGIC, entry.status, len(headers)) + headers + entry.body


def decode(data: Any, ttl: float | None = None) -> CachedResponse | None:
    """The entry ``data`` holds, or None when it is anything but what `encode` writes.

    Only what `CachedRoute` stores is accepted: a ``200`` image or an empty ``204``, with
    header names and values that are valid HTTP (no line breaks) and none of the
    per-request headers.
    """
    if not isinstance(data, bytes) or len(data) < _HEAD.size:
        return None
    magic, status, n = _HEAD.unpack_from(data)
    if magic != MAGIC or n > _MAX_HEADERS_BYTES or len(data) < _HEAD.size + n:
        return None
    try:
        pairs = json.loads(data[_HEAD.size : _HEAD.size + n])
    except ValueError:
        return None
    if not isinstance(pairs, list):
        return None
    headers = []
    for pair in pairs:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(p, str) for p in pair)
            and _TOKEN.fullmatch(pair[0])
            and _VALUE.fullmatch(pair[1])
            and pair[0].lower() not in _PER_REQUEST
        ):
            return None
        headers.append((pair[0].encode("latin-1"), pair[1].encode("latin-1")))
    body = data[_HEAD.size + n :]
    media = dict(headers).get(b"content-type", b"").lower()
    if not ((status == 200 and media.startswith(b"image/")) or (status == 204 and not body)):
        return None
    return CachedResponse(status, body, tuple(headers), ttl=ttl)


def redis_location(url: str) -> str:
    """``scheme://host:port`` (or the socket path) of a Redis URL: no user, password or database."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    try:
        port = parts.port or 6379
    except ValueError:
        port = "?"
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{port}"


class RedisTileStore:
    """Rendered tiles in Redis, shared by every worker and replica (blocking calls: run them in a thread).

    Counters (plain attributes): ``errors`` (failed calls), ``invalid`` (values under our
    keys that are not ours, ignored), ``skipped`` (calls not made while Redis is down).
    """

    def __init__(
        self, url: str, *, prefix: str, ttl: float, timeout: float, backoff: float, max_entry_bytes: int
    ):
        """A client for ``url`` (no connection is made before the first call)."""
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as e:  # pragma: no cover - depends on the installation
            raise RuntimeError(
                "TILER_CACHE_REDIS_URL is set but the `redis` package is missing: "
                "install dinamis-tiler[redis]"
            ) from e
        self.where = redis_location(url)
        password = urlsplit(url).password
        self._secrets = [s for s in {password, unquote(password or "")} if s]
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            client_name="dinamis-tiler",
        )
        self._failures = (redis.RedisError, OSError)
        self._response_error = redis.ResponseError
        self.prefix = prefix
        self.ttl = ttl
        self.backoff = backoff
        self.max_entry_bytes = max_entry_bytes
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self.errors = 0
        self.invalid = 0
        self.skipped = 0
        self.dropped = 0
        self.max_pending = 64
        self._pending = 0
        self._writer: ThreadPoolExecutor | None = None

    def key(self, cache_key: str) -> str:
        """The Redis key of a `tiler.cache.cache_key`."""
        return f"{self.prefix}:{KEY_VERSION}:{hashlib.sha256(cache_key.encode()).hexdigest()}"

    @property
    def down(self) -> bool:
        """True while Redis is considered down (since a failure, until a call succeeds)."""
        return self._down_since is not None

    def get(self, cache_key: str) -> CachedResponse | None:
        """The stored entry, or None (absent, not ours, or Redis unavailable)."""
        if not self._allow():
            return None
        key = self.key(cache_key)
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                data, pttl = pipe.execute(raise_on_error=False)
        except self._failures as e:
            self._failed(e)
            return None
        if isinstance(data, self._response_error) or isinstance(pttl, self._response_error):
            # e.g. WRONGTYPE: someone else's value under our key; Redis itself answers
            self._ok()
            self._count_invalid()
            return None
        if isinstance(data, Exception) or isinstance(pttl, Exception):
            self._failed(data if isinstance(data, Exception) else pttl)
            return None
        self._ok()
        if data is None:
            return None
        entry = decode(data, ttl=pttl / 1000 if isinstance(pttl, int) and pttl > 0 else None)
        if entry is None:
            self._count_invalid()
            log.debug("ignored a value in the shared tile cache that is not a tile (%d bytes)", len(data))
        return entry

    def put(self, cache_key: str, entry: CachedResponse) -> None:
        """Store ``entry`` for ``ttl`` seconds (nothing happens while Redis is down)."""
        data = encode(entry)
        if len(data) > self.max_entry_bytes or not self._allow():
            return
        try:
            self._client.set(self.key(cache_key), data, px=max(1, int(self.ttl * 1000)))
        except self._failures as e:
            self._failed(e)
            return
        self._ok()

    def put_soon(self, cache_key: str, entry: CachedResponse) -> bool:
        """`put` in a background thread, so a miss never waits for Redis.

        At most ``max_pending`` writes wait; past that the entry is not shared (``dropped``
        counts them) rather than queued without bound while Redis is slow.
        """
        with self._lock:
            if self._pending >= self.max_pending:
                self.dropped += 1
                return False
            self._pending += 1
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tile-cache-redis")
            writer = self._writer
        try:
            writer.submit(self._put_then_release, cache_key, entry)
        except RuntimeError:  # shut down (app stopping)
            self._release()
            return False
        return True

    def _put_then_release(self, cache_key: str, entry: CachedResponse) -> None:
        try:
            self.put(cache_key, entry)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until the background writes are done; True if they are."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._pending == 0:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Close the connections (pending background writes are abandoned)."""
        if self._writer is not None:
            self._writer.shutdown(wait=False, cancel_futures=True)
        try:
            self._client.close()
        except self._failures:  # pragma: no cover - closing a broken connection
            pass

    def _count_invalid(self) -> None:
        with self._lock:
            self.invalid += 1

    # ------------------------------------------------------------------ circuit breaker

    def _allow(self) -> bool:
        if self._down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                return True
            if now < self._retry_at:
                self.skipped += 1
                return False
            self._retry_at = now + self.backoff  # this call probes; the others keep skipping
            return True

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            TILE_CACHE_SHARED_ERRORS.inc()
            now = time.monotonic()
            first = self._down_since is None
            if first:
                self._down_since = now
            self._retry_at = now + self.backoff
        if first:
            log.warning(
                "shared tile cache %s unavailable (%s); tiles are rendered without it, "
                "it is tried again every %g s",
                self.where,
                self._describe(exc),
                self.backoff,
            )

    def _ok(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is None:
                return
            down, self._down_since = time.monotonic() - self._down_since, None
        log.info("shared tile cache %s is back after %.1f s", self.where, down)

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text[:300]
