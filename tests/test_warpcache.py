"""The memoised ``calculate_default_transform`` gives GDAL's answers, and tiles stay the same."""

from __future__ import annotations

import threading
import time

import numpy as np
import rasterio
import rio_tiler.mosaic.reader
import rio_tiler.tasks
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


def _ident(asset, *args, delay: float = 0.0, **kwargs):
    time.sleep(delay)
    return threading.get_ident(), asset


def test_one_asset_is_read_in_the_calling_thread():
    warpcache.install()
    tasks = rio_tiler.tasks.create_tasks(_ident, ["ms"], 10)
    assert [v for v, _ in rio_tiler.tasks.filter_tasks(tasks)] == [(threading.get_ident(), "ms")]


def test_several_assets_are_read_by_threads_that_live_on():
    warpcache.install()
    assets = ["b1", "b2", "b3"]
    first = rio_tiler.tasks.create_tasks(_ident, assets, 3, delay=0.05)
    assert all(f.done() for f, _ in first)  # returns once every task has finished, as rio-tiler's
    seen = {v[0] for v, _ in rio_tiler.tasks.filter_tasks(first)}
    assert threading.get_ident() not in seen and len(seen) >= 2  # in parallel
    again = rio_tiler.tasks.create_tasks(_ident, assets, 3, delay=0.05)
    assert [a for _, a in rio_tiler.tasks.filter_tasks(again)] == assets  # in order
    alive = {t.ident for t in threading.enumerate()}
    assert {v[0] for v, _ in rio_tiler.tasks.filter_tasks(again)} <= seen | alive
    assert seen <= alive  # rio-tiler's own pool would have ended its threads


def test_a_task_reading_several_assets_does_not_wait_on_the_pool():
    """A mosaic item (a pool task) reading MS and pan: inner reads run in its own thread."""
    warpcache.install()

    def item(name):
        inner = rio_tiler.tasks.create_tasks(_ident, [f"{name}/ms", f"{name}/pan"], 2, delay=0.05)
        return [v for v, _ in rio_tiler.tasks.filter_tasks(inner)]

    done = []
    runner = threading.Thread(
        target=lambda: done.append(rio_tiler.mosaic.reader.create_tasks(item, ["i1", "i2"], 2))
    )
    runner.start()
    runner.join(10)
    assert done, "nested reads deadlocked"
    for reads, name in rio_tiler.tasks.filter_tasks(done[0]):
        assert [a for _, a in reads] == [f"{name}/ms", f"{name}/pan"]
        assert len({t for t, _ in reads}) == 1  # one after the other, in the item's thread
