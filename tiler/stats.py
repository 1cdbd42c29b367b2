"""Per-band statistics of raster assets, for STAC ``raster:bands[].statistics``.

Computed at ingest on one overview of each COG: the one whose long side is
closest to `TARGET_SIZE` pixels (a file without overviews, i.e. one that fits in
a block or two, is read at full resolution). Nodata and masked pixels are left
out. Besides the raster extension's ``minimum``, ``maximum``, ``mean``,
``stddev`` and ``valid_percent``, each band gets ``percentile_2`` and
``percentile_98``: the server's default stretch (`tiler.reader`), used where a
rendered format needs 8-bit values and no ``rescale`` is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import rasterio

logger = logging.getLogger(__name__)

TARGET_SIZE = 1024
STRETCH_PERCENTILES = (2, 98)
STRETCH_KEYS = tuple(f"percentile_{p}" for p in STRETCH_PERCENTILES)


def is_raster_asset(asset: dict) -> bool:
    """A GeoTIFF/COG asset that declares ``raster:bands``."""
    if not asset.get("raster:bands"):
        return False
    media_type = (asset.get("type") or "").lower()
    if media_type:
        return media_type.startswith("image/tiff") or media_type == "image/vnd.stac.geotiff"
    return asset.get("href", "").lower().split("?")[0].endswith((".tif", ".tiff"))


def has_statistics(asset: dict) -> bool:
    """Every band already has a ``statistics`` object (ours or a provider's: never overwritten)."""
    bands = asset.get("raster:bands") or []
    return bool(bands) and all(b.get("statistics") for b in bands)


def stretch_range(bands: Sequence[dict] | None) -> list[tuple[float, float]] | None:
    """(percentile_2, percentile_98) of each band, or None unless every band has both."""
    if not bands:
        return None
    stats = [b.get("statistics") or {} for b in bands]
    if not all(all(isinstance(s.get(k), int | float) for k in STRETCH_KEYS) for s in stats):
        return None
    return [(float(s[STRETCH_KEYS[0]]), float(s[STRETCH_KEYS[1]])) for s in stats]


def choose_overview(width: int, height: int, factors: Sequence[int], target: int = TARGET_SIZE) -> int | None:
    """Index of the overview whose long side is closest to ``target``; None without overviews."""
    if not factors:
        return None
    long_side = max(width, height)
    sides = [-(-long_side // f) for f in factors]  # GDAL rounds overview sizes up
    return min(range(len(sides)), key=lambda i: (abs(sides[i] - target), sides[i]))


def band_statistics(band: np.ma.MaskedArray) -> dict:
    """Statistics of one band, masked pixels excluded."""
    valid = np.ma.compressed(band).astype("float64")
    out: dict[str, float] = {}
    if valid.size:
        low, high = np.percentile(valid, STRETCH_PERCENTILES)
        out = {
            "minimum": float(valid.min()),
            "maximum": float(valid.max()),
            "mean": float(valid.mean()),
            "stddev": float(valid.std()),
            STRETCH_KEYS[0]: float(low),
            STRETCH_KEYS[1]: float(high),
        }
    out["valid_percent"] = 100.0 * valid.size / band.size
    return out


def raster_statistics(href: str) -> tuple[list[dict], int | None]:
    """Statistics of every band of the raster at ``href``, and the overview level read.

    Run inside a ``rasterio.Env`` with the GDAL options for remote reads.
    """
    with rasterio.open(href) as src:
        level = choose_overview(src.width, src.height, src.overviews(1))
    opts = {} if level is None else {"overview_level": level}
    with rasterio.open(href, **opts) as src:
        data = src.read(masked=True)
    return [band_statistics(band) for band in data], level
