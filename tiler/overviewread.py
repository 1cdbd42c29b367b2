"""Reprojected reads from the overview GDAL would pick, without GDAL building the other ones.

rio-tiler reads a reprojected tile through a ``WarpedVRT`` at the dataset's resolution and
asks for a smaller output; GDAL (3.10) then builds an "implicit overview" warped VRT for
*every* overview of the source, each with a copy of the VRT's transformer made through its
XML form, and reads from one of them. Each copy re-creates two PROJ coordinate
transformations; GDAL's transformation cache keeps one per key while the five VRTs of a tile
each hold their own, so nearly all of them search PROJ's database again (measured with perf
probes on a pan z15 tile: 21 ``proj_create_crs_to_crs`` calls, ~45 % of the read's CPU).

`read` (rio-tiler's ``rio_tiler.reader.read``, installed by `install`) does what GDAL would
do with one warped VRT: it chooses the overview level the way GDAL's
``GDALBandGetBestOverviewLevel2`` chooses among the implicit overviews (same sizes, same
oversampling threshold), opens that level alone (``OVERVIEW_LEVEL=<n> only``, or ``NONE`` when
GDAL would read the full resolution), and warps from it on the grid GDAL's implicit overview
has (the VRT's geotransform scaled by the same ratios). The pixels are GDAL's:
tests/test_overviewread.py compares every field of the tiles with rio-tiler's own read over
many grids. The band metadata (descriptions, statistics, scales, offsets) comes from the
dataset itself, as with rio-tiler's VRT, and the bounds from rio-tiler's grid.

Reads GDAL serves at full resolution (an output not smaller than the VRT: max zoom) go to
the full-resolution handle too, so one handle per file decodes those blocks; at most
`LEVELS_KEPT` level handles stay open per dataset, without GDAL's per-handle read cache.

Only the common case takes this path: a plain dataset with overviews, a reprojection with
rio-tiler's grid options and nothing else, no window, nearest resampling for the output and
no unscaling. Anything else, or any failure to open the level, is rio-tiler's read unchanged.
``TILER_READER_DIRECT_OVERVIEWS=false`` turns it off.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from typing import Any

import attr
import rasterio
import rio_tiler.reader
from affine import Affine
from rasterio.env import get_gdal_config
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rio_tiler.utils import has_alpha_band

logger = logging.getLogger(__name__)

_rio_tiler_read = rio_tiler.reader.read
_SIGNATURE = inspect.signature(_rio_tiler_read)
#: the GDAL minor version whose overview choice `_choose` follows
GDAL_MINOR = "3.10."
#: rio-tiler's grid options (`rio_tiler.reader.part`); any other VRT option: rio-tiler's read
_GRID_OPTIONS = {"crs", "transform", "width", "height", "dtype"}
#: GDAL's default oversampling threshold for a nearest-neighbour read (GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD)
_NEAREST_THRESHOLD = 1.2

#: overview levels kept open per dataset, least recently used closed first (the full
#: resolution and the level of the zoom in view)
LEVELS_KEPT = 2

_lock = threading.Lock()
#: per open dataset: sizes of its overviews, the datasets of single levels, band metadata
_derived: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
_stats = {"direct": 0, "rio_tiler": 0, "fallback": 0}


def stats() -> dict[str, int]:
    """Reads done directly from a level, by rio-tiler, and after a failure to open a level (tests, metrics)."""
    with _lock:
        return dict(_stats)


def _count(key: str) -> None:
    with _lock:
        _stats[key] += 1


def _close_levels(levels: dict) -> None:
    for ds in list(levels.values()):
        try:
            ds.close()
        except Exception:  # noqa: BLE001 - a level GDAL already gave up on
            logger.debug("closing an overview level failed", exc_info=True)
    levels.clear()


def _state(src_dst: Any) -> dict:
    """What is kept for an open dataset; its levels are closed with it (or when it is collected)."""
    with _lock:
        state = _derived.get(src_dst)
        if state is None:
            state = _derived[src_dst] = {"levels": {}, "meta": {}}
            weakref.finalize(src_dst, _close_levels, state["levels"])
        return state


def _overview_sizes(src_dst: Any, state: dict) -> list[tuple[int, int]]:
    """(width, height) of each overview of band 1, as GDAL gives them."""
    sizes = state.get("sizes")
    if sizes is None:
        sizes = []
        for i in range(len(src_dst.overviews(1))):  # opened once to be measured, not kept
            with _open(src_dst.name, f"{i} only") as level:
                sizes.append((level.width, level.height))
        state["sizes"] = sizes
    return sizes


def _open(name: str, level: str) -> Any:
    """``name`` at one level, without GDAL's per-handle read cache (``VSI_CACHE``, up to 5 MB each).

    The bytes are cached already where the dataset itself reads them from (the known-size
    reader's chunk cache, GDAL's ``/vsicurl/`` cache); a cache per level handle only adds memory.
    """
    with rasterio.Env(VSI_CACHE=False):
        return rasterio.open(name, OVERVIEW_LEVEL=level)


def _level(src_dst: Any, state: dict, level: int | None) -> Any:
    """The dataset of one overview level alone (None: the full resolution without overviews).

    At most `LEVELS_KEPT` levels stay open per dataset (a map view reads one or two).
    """
    levels = state["levels"]
    ds = levels.pop(level, None)
    if ds is None or ds.closed:
        option = "NONE" if level is None else f"{level} only"
        ds = _open(src_dst.name, option)
    levels[level] = ds  # most recently used last
    while len(levels) > LEVELS_KEPT:
        oldest = next(iter(levels))
        _close_levels({oldest: levels.pop(oldest)})
    return ds


def close_derived(src_dst: Any) -> None:
    """Close the level datasets opened for ``src_dst`` (when it is closed itself)."""
    with _lock:
        state = _derived.pop(src_dst, None)
    if state is not None:
        _close_levels(state["levels"])


def _choose(
    sizes: list[tuple[int, int]],
    src_w: int,
    vrt_size: tuple[int, int],
    out_size: tuple[int, int],
) -> tuple[int, int, int] | None:
    """GDAL's pick among the warped VRT's implicit overviews: (source level, width, height), or None.

    Implicit overview ``i`` of a ``W`` x ``H`` warped VRT is ``int(W / r + 0.5)`` x
    ``int(H / r + 0.5)`` with ``r`` = source width / width of the source's overview ``i``;
    GDAL takes the most reduced one whose reduction stays below 1.2 x the requested one.
    """
    (w, h), (out_w, out_h) = vrt_size, out_size
    desired = w / out_w if (w / out_w) < (h / out_h) or out_h == 1 else h / out_h
    best, best_res = None, 0.0
    for i, (ovr_w, _) in enumerate(sizes):
        ratio = src_w / ovr_w
        ow, oh = int(w / ratio + 0.5), int(h / ratio + 0.5)
        if ow < 1 or oh < 1:
            break
        if ow > w or oh > h:
            continue
        res = min(w / ow, h / oh)
        if res >= desired * _NEAREST_THRESHOLD or res <= best_res:
            continue
        best, best_res = (i, ow, oh), res
    return best


def _metadata(src_dst: Any, state: dict, vrt_options: dict, nodata: Any) -> dict:
    """What rio-tiler's VRT of ``src_dst`` reports (band descriptions, tags, scales, offsets): once per dataset."""
    key = (str(vrt_options["crs"]), vrt_options.get("dtype"), repr(nodata))
    meta = state["meta"].get(key)
    if meta is None:
        # rio-tiler's VRT parameters (`rio_tiler.reader.read`), on the dataset's own grid
        params: dict[str, Any] = {
            "crs": vrt_options["crs"],
            "add_alpha": True,
            "dtype": vrt_options.get("dtype"),
        }
        if nodata is not None:
            params.update(nodata=nodata, src_nodata=nodata, add_alpha=False)
        if has_alpha_band(src_dst):
            params["add_alpha"] = False
        with WarpedVRT(src_dst, **params) as vrt:
            meta = {
                "descriptions": vrt.descriptions,
                "tags": [vrt.tags(i) for i in range(1, vrt.count + 1)],
                "dataset_tags": vrt.tags(),
                "scales": vrt.scales,
                "offsets": vrt.offsets,
            }
        state["meta"][key] = meta
    return meta


def _with_metadata(img: Any, meta: dict, bounds: tuple) -> Any:
    """rio-tiler's ImageData fields taken from its VRT, for ``img`` read from a level."""
    idx = [int(name[1:]) for name in img.band_names]
    stats = []
    for ix in idx:
        tags = meta["tags"][ix - 1]
        if "STATISTICS_MINIMUM" in tags and "STATISTICS_MAXIMUM" in tags:
            stats.append((float(tags["STATISTICS_MINIMUM"]), float(tags["STATISTICS_MAXIMUM"])))
    last = idx[-1]
    return attr.evolve(
        img,
        bounds=bounds,
        # rio-tiler 9.4 names every band after the last index read (its loop variable); kept as is
        band_descriptions=[meta["descriptions"][last - 1] or f"b{ix}" for ix in idx],
        dataset_statistics=stats if len(stats) == len(idx) else None,
        metadata=meta["dataset_tags"],
        scales=[meta["scales"][ix - 1] for ix in idx],
        offsets=[meta["offsets"][ix - 1] for ix in idx],
    )


def read(src_dst: Any, *args: Any, **kwargs: Any) -> Any:
    """``rio_tiler.reader.read``, from the single overview level GDAL would read (see the module)."""
    try:
        bound = _SIGNATURE.bind(src_dst, *args, **kwargs)
    except TypeError:
        return _rio_tiler_read(src_dst, *args, **kwargs)  # rio-tiler raises the error
    bound.apply_defaults()
    params = dict(bound.arguments)
    plan = _plan(**params)
    if plan is None:
        _count("rio_tiler")
        return _rio_tiler_read(src_dst, *args, **kwargs)
    level, size = plan
    vrt_options = params["vrt_options"]
    state = _state(src_dst)
    nodata = params["nodata"] if params["nodata"] is not None else src_dst.nodata
    try:
        level_ds = _level(src_dst, state, level)
        meta = _metadata(src_dst, state, vrt_options, nodata)
    except Exception as e:  # noqa: BLE001 - the level cannot be opened: rio-tiler's read
        logger.debug("overview level not opened (%s); rio-tiler's read", e.__class__.__name__)
        _count("fallback")
        return _rio_tiler_read(src_dst, *args, **kwargs)
    t, w, h = vrt_options["transform"], vrt_options["width"], vrt_options["height"]
    options = dict(vrt_options)
    if size is not None:  # the grid of GDAL's implicit overview (RescaleDstGeoTransform)
        ow, oh = size
        rx, ry = w / ow, h / oh
        options.update(
            transform=Affine(t.a * rx, t.b * rx, t.c, t.d * ry, t.e * ry, t.f), width=ow, height=oh
        )
    params.update(src_dst=level_ds, vrt_options=options, nodata=nodata)
    img = _rio_tiler_read(**params)
    _count("direct")
    # rio-tiler's VRT bounds (DatasetBase.bounds of an unrotated grid)
    return _with_metadata(img, meta, (t.c, t.f + t.e * h, t.c + t.a * w, t.f))


def _plan(
    src_dst: Any,
    dst_crs: Any = None,
    height: int | None = None,
    width: int | None = None,
    max_size: int | None = None,
    indexes: Any = None,
    window: Any = None,
    nodata: Any = None,
    vrt_options: dict | None = None,
    out_dtype: Any = None,
    resampling_method: str = "nearest",
    reproject_method: str = "nearest",
    unscale: bool = False,
    post_process: Any = None,
) -> tuple[int | None, tuple[int, int] | None] | None:
    """(level or None for the full resolution, implicit overview size or None), or None: rio-tiler's read."""
    if (
        type(src_dst) is not DatasetReader
        or src_dst.closed
        or not vrt_options
        or not set(vrt_options) <= _GRID_OPTIONS
        or not {"crs", "transform", "width", "height"} <= set(vrt_options)
        or window is not None
        or unscale
        or resampling_method != "nearest"
        or not height
        or not width
        or max_size is not None
    ):
        return None
    t = vrt_options["transform"]
    w, h = vrt_options["width"], vrt_options["height"]
    if t.b != 0 or t.d != 0 or vrt_options["crs"] == src_dst.crs:
        return None
    if not src_dst.overviews(1) or get_gdal_config("GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD") is not None:
        return None
    if not (width < w or height < h):
        # GDAL consults no overview when the output is not smaller: the full resolution, read
        # from the same handle as the downsampled full-resolution reads (one decode buffer)
        return None, None
    try:
        sizes = _overview_sizes(src_dst, _state(src_dst))
    except Exception:  # noqa: BLE001 - cannot open the levels: rio-tiler's read
        return None
    best = _choose(sizes, src_dst.width, (w, h), (width, height))
    if best is None:
        return None, None
    level, ow, oh = best
    return level, (ow, oh)


def install() -> bool:
    """Point rio-tiler's ``part`` at `read` (idempotent); False with a GDAL `_choose` was not checked against."""
    if not rasterio.__gdal_version__.startswith(GDAL_MINOR):
        logger.info("GDAL %s: reprojected reads left to rio-tiler", rasterio.__gdal_version__)
        uninstall()
        return False
    rio_tiler.reader.read = read
    return True


def uninstall() -> None:
    """rio-tiler's own read again (tests)."""
    rio_tiler.reader.read = _rio_tiler_read
