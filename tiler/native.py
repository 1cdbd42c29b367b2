"""The C calls rasterio does not expose, made with ctypes: libgdal, and glibc's malloc.

libgdal is the one rasterio uses (its wheel bundles one; else the system's), loaded once
and shared by every caller; each function's prototype (``argtypes``/``restype``) is
declared once, the first time it is used, so a GDAL without one of them fails only
where that one is needed. Callers get small typed functions:

* path-specific options and /vsicurl/ cache clearing (`tiler.upstream`),
* global config options, network statistics and the block cache's size (`tiler.metrics`),
* glibc's malloc arena cap (`tiler.datasets`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_s, _p = ctypes.c_char_p, ctypes.c_void_p

#: name -> (argtypes, restype) of the libgdal functions used here
_GDAL_PROTOTYPES: dict[str, tuple[list, type | None]] = {
    "VSISetPathSpecificOption": ([_s, _s, _s], None),
    "VSICurlClearCache": ([], None),
    "VSICurlPartialClearCache": ([_s], None),
    "CPLSetConfigOption": ([_s, _s], None),
    "VSINetworkStatsGetAsSerializedJSON": ([_p], _p),
    "VSINetworkStatsReset": ([], None),
    "VSIFree": ([_p], None),
    "GDALGetCacheUsed64": ([], ctypes.c_int64),
    "GDALGetCacheMax64": ([], ctypes.c_int64),
    "GDALSetCacheMax64": ([ctypes.c_int64], None),
}

#: glibc's mallopt parameter numbers of M_ARENA_MAX and M_MMAP_THRESHOLD (malloc.h)
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3

#: Makes the calls that change per-path options or the /vsicurl/ cache one at a time.
_vsi_lock = threading.Lock()


@functools.cache
def _libgdal() -> ctypes.CDLL:
    """Rasterio's own libgdal (its wheel bundles one), else the system one."""
    import rasterio  # here: the malloc call alone needs neither rasterio nor GDAL

    here = Path(rasterio.__file__).parent
    candidates = sorted(glob.glob(str(here.parent / "rasterio.libs" / "libgdal*"))) or ["libgdal.so"]
    return ctypes.CDLL(candidates[0])


@functools.cache
def _gdal(name: str) -> Callable[..., Any]:
    """The libgdal function ``name`` with its prototype from `_GDAL_PROTOTYPES`."""
    fn = getattr(_libgdal(), name)
    fn.argtypes, fn.restype = _GDAL_PROTOTYPES[name]
    return fn


def _bytes(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


def set_path_option(path: str, key: str, value: str | None) -> None:
    """``VSISetPathSpecificOption``: ``key`` for GDAL paths under ``path`` (None removes it)."""
    with _vsi_lock:
        _gdal("VSISetPathSpecificOption")(path.encode(), key.encode(), _bytes(value))


def clear_curl_cache(path: str | None = None) -> None:
    """``VSICurlClearCache`` (all), or ``VSICurlPartialClearCache`` of the GDAL paths under ``path``."""
    with _vsi_lock:
        if path is None:
            _gdal("VSICurlClearCache")()
        else:
            _gdal("VSICurlPartialClearCache")(path.encode())


def set_config_option(key: str, value: str | None) -> None:
    """``CPLSetConfigOption``: a process-wide GDAL config option (None unsets it)."""
    _gdal("CPLSetConfigOption")(key.encode(), _bytes(value))


def gdal_block_cache() -> tuple[int, int]:
    """Bytes in GDAL's block cache now, and its bound (``GDAL_CACHEMAX``), process-wide."""
    return int(_gdal("GDALGetCacheUsed64")()), int(_gdal("GDALGetCacheMax64")())


def set_gdal_cache_max(n: int) -> None:
    """``GDALSetCacheMax64``: bound GDAL's block cache to ``n`` bytes, process-wide (flushes down to it)."""
    _gdal("GDALSetCacheMax64")(n)


def take_network_stats() -> str | None:
    """GDAL's network statistics as JSON text, then reset them (None when GDAL has none)."""
    ptr = _gdal("VSINetworkStatsGetAsSerializedJSON")(None)
    _gdal("VSINetworkStatsReset")()
    if not ptr:
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8", "replace")
    finally:
        _gdal("VSIFree")(ptr)


def set_malloc_arena_max(n: int) -> bool:
    """``mallopt(M_ARENA_MAX, n)`` in glibc; False when it fails or this is not glibc."""
    return _mallopt(M_ARENA_MAX, n)


def set_malloc_mmap_threshold(n: int) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, n)`` in glibc (fixes it: no dynamic threshold); False when it fails."""
    return _mallopt(M_MMAP_THRESHOLD, n)


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
