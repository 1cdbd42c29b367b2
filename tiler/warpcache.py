"""Per-process shortcuts for work rio-tiler repeats on every tile with the same answer.

* ``calculate_default_transform``: rio-tiler's ``get_vrt_transform`` asks GDAL for the
  dataset's resolution in the tile grid's CRS on every tile read (0.6-1 ms: GDAL builds a PROJ
  transformation and samples the whole footprint), although the answer depends only on the
  dataset's CRS, size and bounds and the grid's CRS. `install` wraps the function rio-tiler
  calls in a small LRU keyed on exactly those inputs; the values are the ones GDAL returned
  the first time, so tiles are unchanged (tests/test_warpcache.py compares both).
* rio-tiler's task runner (``rio_tiler.tasks.create_tasks``): it starts a new
  ``ThreadPoolExecutor`` for every multi-asset read and every mosaic chunk, even for one
  asset, so each tile is read in a brand-new thread, and GDAL and PROJ set up their
  per-thread state (PROJ context, database handle, caches) again for it. `create_tasks`
  reads a single asset in the calling thread, and several in a process-wide pool whose
  threads live on; like rio-tiler's, it returns once every task has finished, and a task
  that itself reads several assets (a mosaic item in the pool) reads them one after the
  other, so the pool never waits on itself. Tiles are the same (the same reads, in the same order).
* ``GDAL_DATA`` / ``PROJ_DATA``: without them rasterio searches for its data directories
  (several ``stat`` calls) each time a GDAL environment starts, which rio-tiler does several
  times per tile; `install` sets them once to the directories rasterio would find.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import rio_tiler.mosaic.reader
import rio_tiler.tasks
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


_pools: dict[int, futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_in_pool = threading.local()


def _mark_pool_thread() -> None:
    _in_pool.active = True


def _pool(threads: int) -> futures.ThreadPoolExecutor:
    """The process's pool of ``threads`` workers (one per size asked, created on first use)."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="rio-tiler", initializer=_mark_pool_thread
            )
        return pool


def _forget_pools() -> None:
    """In a forked child the parent's pool threads do not exist: start afresh."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def create_tasks(reader: Callable, asset_list: Sequence, threads: int, *args: Any, **kwargs: Any) -> list:
    """rio-tiler's ``create_tasks`` without a new thread pool per call (see the module's doc)."""
    if not threads or threads <= 1 or len(asset_list) <= 1 or getattr(_in_pool, "active", False):
        return [(functools.partial(reader, asset, *args, **kwargs), asset) for asset in asset_list]
    pool = _pool(threads)
    tasks = [(pool.submit(reader, asset, *args, **kwargs), asset) for asset in asset_list]
    futures.wait([f for f, _ in tasks])
    return tasks


def install() -> None:
    """Point rio-tiler at the memoised transform and `create_tasks`; pin rasterio's data directories.

    Idempotent.
    """
    rio_tiler.utils.calculate_default_transform = calculate_default_transform
    rio_tiler.tasks.create_tasks = create_tasks
    rio_tiler.mosaic.reader.create_tasks = create_tasks
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
