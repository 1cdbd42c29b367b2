"""Open COG datasets kept across requests: a bounded pool per worker process.

rio-tiler opens (``rasterio.open``) every asset of every request and closes it at the end.
Closing a GDAL dataset throws away its decoded blocks, and the next tile of the same file
decodes them again; the open itself parses the TIFF directories anew. Measured on a 6 m
MS COG served over HTTP: 15 ms per z15 tile when each read opens the file, 6 ms with the
file kept open (the tiles of a view share blocks).

`DatasetPool` keeps idle datasets by the (unsigned) href they were opened for:

* a dataset is used by one reader at a time: `take` hands out an idle one (or None) and
  `give` puts it back; a reader that saw any failure closes its dataset instead;
* bounded: at most ``max_open`` idle datasets per process, ``per_file`` per href, each
  idle for at most ``ttl`` seconds (a file replaced at the same URL is seen after that);
* `discard` drops the datasets under a URL prefix or of one file (after an upstream
  failure or a credentials change, with GDAL's own cache of those files).

A signed href is not what the pool is keyed on: the signed URL a dataset was opened
with may expire while it is idle; the reader then gets a 401/403, signs again and
reopens (`tiler.upstream.SigningReader`), and the expired dataset is closed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from tiler import native, overviewread

logger = logging.getLogger(__name__)


class DatasetPool:
    """Idle rasterio datasets by href, least recently used first out."""

    def __init__(self, max_open: int = 32, per_file: int = 4, ttl: float = 300.0) -> None:
        """``max_open`` idle datasets in all, ``per_file`` per href, ``ttl`` seconds idle each."""
        self.max_open = max_open
        self.per_file = per_file
        self.ttl = ttl
        self._lock = threading.Lock()
        # (href, serial) -> (dataset, time it was given back); insertion order = LRU order
        self._idle: OrderedDict[tuple[str, int], tuple[Any, float]] = OrderedDict()
        self._serial = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when the pool keeps nothing (``max_open`` 0)."""
        return self.max_open > 0 and self.per_file > 0

    def __len__(self) -> int:
        """Idle datasets held."""
        return len(self._idle)

    def take(self, href: str) -> Any | None:
        """An idle dataset opened for ``href`` (most recently given back), or None."""
        if not self.enabled:
            return None
        now = time.monotonic()
        stale: list[Any] = []
        found = None
        with self._lock:
            for key in reversed(list(self._idle)):
                if key[0] != href:
                    continue
                ds, since = self._idle.pop(key)
                if now - since > self.ttl:
                    stale.append(ds)
                    continue
                found = ds
                break
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        _close(stale)
        return found

    def give(self, href: str, dataset: Any) -> None:
        """Keep ``dataset`` (opened for ``href``) for a later `take`; closes what no longer fits."""
        if not self.enabled or dataset.closed:
            _close([dataset])
            return
        now = time.monotonic()
        evicted: list[Any] = []
        with self._lock:
            self._serial += 1
            self._idle[(href, self._serial)] = (dataset, now)
            same = [k for k in self._idle if k[0] == href]
            for key in same[: max(0, len(same) - self.per_file)]:
                evicted.append(self._idle.pop(key)[0])
            for key, (ds, since) in list(self._idle.items()):
                if len(self._idle) <= self.max_open and now - since <= self.ttl:
                    break
                del self._idle[key]
                evicted.append(ds)
        _close(evicted)

    def discard(self, prefix: str | None = None) -> None:
        """Close the idle datasets whose href starts with ``prefix`` (all when None)."""
        with self._lock:
            keys = [k for k in self._idle if prefix is None or k[0].startswith(prefix)]
            dropped = [self._idle.pop(k)[0] for k in keys]
        _close(dropped)

    def clear(self) -> None:
        """Close every idle dataset."""
        self.discard(None)


def _close(datasets: list[Any]) -> None:
    for ds in datasets:
        overviewread.close_derived(ds)  # the overview levels opened for it go with it
        try:
            ds.close()
        except Exception:  # noqa: BLE001 - closing a dataset GDAL already gave up on
            logger.debug("closing a pooled dataset failed", exc_info=True)


#: The process's pool (`configure` sets its bounds at app start; 0 disables it).
POOL = DatasetPool()


def configure(max_open: int, per_file: int, ttl: float) -> DatasetPool:
    """Set the bounds of `POOL` (closing what it holds)."""
    POOL.clear()
    POOL.max_open, POOL.per_file, POOL.ttl = max_open, per_file, ttl
    return POOL


def limit_malloc_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas of this process at ``n`` (0: leave glibc's default).

    Each thread that meets contention gets its own arena (up to 8 per core), and freed
    numpy/GDAL buffers stay spread over them: RSS grows well past what is in use. Must run
    before the render threads start (arenas already created stay). True when applied.
    """
    if n <= 0 or not sys.platform.startswith("linux"):
        return False
    return native.set_malloc_arena_max(n)


def fix_malloc_mmap_threshold(kib: int) -> bool:
    """Serve allocations of ``kib`` KiB and more with their own mmap, for good (0: glibc's default).

    glibc starts at 128 KiB but raises the threshold each time such a block is freed (up to
    32 MiB), after which GDAL's blocks, decoded tiles and numpy arrays come from the heap,
    whose freed holes are reused only in part: RSS keeps creeping up for as long as the
    sizes vary. A fixed threshold hands each large buffer back to the system when it is
    freed. True when applied.
    """
    if kib <= 0 or not sys.platform.startswith("linux"):
        return False
    return native.set_malloc_mmap_threshold(kib * 1024)
