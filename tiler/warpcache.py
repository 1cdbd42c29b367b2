"""Per-process shortcuts for work rio-tiler repeats on every tile with the same answer.

* ``calculate_default_transform``: rio-tiler's ``get_vrt_transform`` asks GDAL for the
  dataset's resolution in the tile grid's CRS on every tile read (0.6-1 ms: GDAL builds a PROJ
  transformation and samples the whole footprint), although the answer depends only on the
  dataset's CRS, size and bounds and the grid's CRS. `install` wraps the function rio-tiler
  calls in a small LRU keyed on exactly those inputs; the values are the ones GDAL returned
  the first time, so tiles are unchanged (tests/test_warpcache.py compares both).
* ``GDAL_DATA`` / ``PROJ_DATA``: without them rasterio searches for its data directories
  (several ``stat`` calls) each time a GDAL environment starts, which rio-tiler does several
  times per tile; `install` sets them once to the directories rasterio would find.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from typing import Any

import rio_tiler.utils
from rasterio.warp import calculate_default_transform as _gdal_calculate_default_transform

_MAX = 256
_lock = threading.Lock()
_memo: OrderedDict[tuple, Any] = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def _crs_key(crs: Any) -> Any:
    to_wkt = getattr(crs, "to_wkt", None)
    return to_wkt() if to_wkt is not None else repr(crs)


@functools.wraps(_gdal_calculate_default_transform)
def calculate_default_transform(src_crs, dst_crs, width, height, *bounds, **kwargs):  # noqa: ANN001, ANN201, D103
    try:
        key = (
            _crs_key(src_crs),
            _crs_key(dst_crs),
            width,
            height,
            tuple(bounds),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
        )
        hash(key)
    except Exception:  # noqa: BLE001 - an input we cannot key: ask GDAL
        return _gdal_calculate_default_transform(src_crs, dst_crs, width, height, *bounds, **kwargs)
    with _lock:
        if key in _memo:
            _memo.move_to_end(key)
            _stats["hits"] += 1
            return _memo[key]
    value = _gdal_calculate_default_transform(src_crs, dst_crs, width, height, *bounds, **kwargs)
    with _lock:
        _stats["misses"] += 1
        _memo[key] = value
        while len(_memo) > _MAX:
            _memo.popitem(last=False)
    return value


def stats() -> dict[str, int]:
    """Hits and misses of the transform memo (tests)."""
    with _lock:
        return dict(_stats, size=len(_memo))


def clear() -> None:
    """Forget the memo (tests)."""
    with _lock:
        _memo.clear()
        _stats.update(hits=0, misses=0)


def install() -> None:
    """Point rio-tiler at the memoised transform and pin rasterio's data directories (idempotent)."""
    rio_tiler.utils.calculate_default_transform = calculate_default_transform
    try:
        from rasterio._env import GDALDataFinder, PROJDataFinder
    except ImportError:  # pragma: no cover - rasterio without its finders
        return
    if not os.environ.get("GDAL_DATA"):
        found = GDALDataFinder().search()
        if found:
            os.environ["GDAL_DATA"] = found
    if not (os.environ.get("PROJ_DATA") or os.environ.get("PROJ_LIB")):
        found = PROJDataFinder().search()
        if found:
            os.environ["PROJ_DATA"] = found
