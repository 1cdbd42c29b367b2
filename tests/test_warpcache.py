"""The memoised ``calculate_default_transform`` gives GDAL's answers, and tiles stay the same."""

from __future__ import annotations

import numpy as np
import rasterio
import rio_tiler.utils
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform as gdal_cdt
from rio_tiler.io import Reader

from tests.helpers import mercator_tile
from tiler import warpcache


def test_memo_returns_gdals_answer_for_each_input(sample):
    warpcache.clear()
    for i in range(len(sample.items)):
        for asset in ("ms", "pan"):
            with rasterio.open(sample.path(i, asset)) as src:
                for dst in (CRS.from_epsg(3857), CRS.from_epsg(4326), CRS.from_epsg(2154)):
                    args = (src.crs, dst, src.width, src.height, *src.bounds)
                    want = gdal_cdt(*args)
                    assert warpcache.calculate_default_transform(*args) == want  # miss
                    assert warpcache.calculate_default_transform(*args) == want  # hit
                    kw = {"resolution": 10.0}
                    assert warpcache.calculate_default_transform(*args, **kw) == gdal_cdt(*args, **kw)
    st, n = warpcache.stats(), len(sample.items) * 2 * 3
    assert (st["misses"], st["hits"]) == (2 * n, n)  # each input asked GDAL once


def test_installed_tiles_equal_gdal_tiles(sample):
    item = sample.item(0)
    lon, lat = (item["bbox"][0] + item["bbox"][2]) / 2, (item["bbox"][1] + item["bbox"][3]) / 2
    warpcache.install()
    assert rio_tiler.utils.calculate_default_transform is warpcache.calculate_default_transform
    warpcache.clear()
    tiles = []
    for z in (14, 15, 16):
        x, y = mercator_tile(lon, lat, z)
        tiles += [(x, y, z), (x + 1, y, z)]
    cached = {}
    with Reader(str(sample.path(0, "ms"))) as r:
        for t in tiles:
            if r.tile_exists(*t):
                cached[t] = r.tile(*t)
    assert warpcache.stats()["hits"] >= len(cached) - 1
    try:
        rio_tiler.utils.calculate_default_transform = gdal_cdt
        with Reader(str(sample.path(0, "ms"))) as r:
            for t, img in cached.items():
                ref = r.tile(*t)
                np.testing.assert_array_equal(img.array.data, ref.array.data)
                np.testing.assert_array_equal(img.array.mask, ref.array.mask)
                assert img.bounds == ref.bounds
    finally:
        warpcache.install()
    assert len(cached) >= 4
