"""Open datasets kept across requests (`tiler.datasets`): bounds, exclusivity, failures."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio

from tests.helpers import expected_nearest, mercator_tile, mercator_tile_centres
from tiler import datasets
from tiler.datasets import DatasetPool
from tiler.settings import GdalSettings
from tiler.upstream import SigningReader, clear_http_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def gdal_env():
    """The GDAL options the app reads with (no directory listing, timeouts)."""
    with rasterio.Env(**GdalSettings().options()):
        yield


def _open(sample, n: int = 1) -> list:
    return [rasterio.open(sample.path(0, "ms")) for _ in range(n)]


def test_pool_bounds_per_file_total_and_ttl(sample):
    pool = DatasetPool(max_open=3, per_file=2, ttl=0.3)
    a = _open(sample, 3)
    for ds in a:
        pool.give("a", ds)
    # per file: the oldest of the three was closed, the two most recent are kept
    assert a[0].closed and not a[1].closed and not a[2].closed and len(pool) == 2
    assert pool.take("a") is a[2] and pool.take("a") is a[1] and pool.take("a") is None
    assert (pool.hits, pool.misses) == (2, 1)
    # in all: a fourth dataset pushes out the least recently given back
    b = _open(sample, 4)
    for i, ds in enumerate(b):
        pool.give(f"f{i}", ds)
    assert b[0].closed and all(not ds.closed for ds in b[1:]) and len(pool) == 3
    # idle past the ttl: closed instead of handed out
    time.sleep(0.35)
    assert pool.take("f3") is None and b[3].closed
    pool.clear()
    assert len(pool) == 0 and all(ds.closed for ds in b)
    # disabled: nothing kept
    off = DatasetPool(max_open=0)
    ds = _open(sample)[0]
    off.give("x", ds)
    assert ds.closed and off.take("x") is None


def test_discard_by_prefix(sample):
    pool = DatasetPool()
    a, b = _open(sample, 2)
    pool.give("http://h/one.tif", a)
    pool.give("http://h/two.tif", b)
    pool.discard("http://h/one.tif")
    assert a.closed and not b.closed
    pool.discard("http://h/")
    assert b.closed and len(pool) == 0


def _tile_of(sample, z: int = 15) -> tuple[int, int, int]:
    geom = sample.item(0)["geometry"]["coordinates"][0]
    lon = sum(p[0] for p in geom[:-1]) / (len(geom) - 1)
    lat = sum(p[1] for p in geom[:-1]) / (len(geom) - 1)
    x, y = mercator_tile(lon, lat, z)
    return x, y, z


def test_reader_reuses_the_dataset_and_reads_right_pixels(sample):
    """A second reader of the same href gets the first one's dataset; pixels stay exact."""
    href = sample.item(0)["assets"]["ms"]["href"]
    clear_http_cache()
    datasets.POOL.clear()
    x, y, z = _tile_of(sample)
    with SigningReader(href) as r:
        first = r.dataset
        img1 = r.tile(x, y, z, indexes=(1, 2, 3))
    assert not first.closed and len(datasets.POOL) >= 1
    with SigningReader(href) as r:
        assert r.dataset is first  # taken from the pool, not opened again
        img2 = r.tile(x + 1, y, z, indexes=(1, 2, 3))
    for tx, img in ((x, img1), (x + 1, img2)):
        xs, ys = mercator_tile_centres(tx, y, z)
        want, valid = expected_nearest(sample.path(0, "ms"), xs, ys)
        ok = valid & (img.mask > 0)
        assert ok.sum() > 1000
        # nearest resampling on a reprojected grid: allow a sliver of off-by-one-pixel picks
        same = np.all(img.array.data[:, ok] == want[:3][:, ok], axis=0).mean()
        assert same > 0.97, same


def test_concurrent_readers_never_share_a_dataset(sample):
    """8 threads x 6 tiles of one file: every tile equals the one read alone."""
    href = sample.item(0)["assets"]["ms"]["href"]
    x, y, z = _tile_of(sample)
    tiles = [(x + dx, y + dy) for dx in (-1, 0, 1) for dy in (-1, 0)]
    datasets.POOL.clear()
    alone = {}
    for tx, ty in tiles:
        with SigningReader(href) as r:
            alone[(tx, ty)] = r.tile(tx, ty, z, indexes=(1, 2, 3)).array
    in_use: set[int] = set()
    clash = []
    lock = threading.Lock()

    options = GdalSettings().options()

    def work(k: int) -> int:
        with rasterio.Env(**options):
            return _work(k)

    def _work(k: int) -> int:
        bad = 0
        for i in range(len(tiles)):
            tx, ty = tiles[(i + k) % len(tiles)]
            with SigningReader(href) as r:
                with lock:
                    if id(r.dataset) in in_use:
                        clash.append(id(r.dataset))
                    in_use.add(id(r.dataset))
                arr = r.tile(tx, ty, z, indexes=(1, 2, 3)).array
                with lock:
                    in_use.discard(id(r.dataset))
            bad += int(
                not np.ma.allequal(arr, alone[(tx, ty)]) or not np.array_equal(arr.mask, alone[(tx, ty)].mask)
            )
        return bad

    with ThreadPoolExecutor(8) as ex:
        bad = sum(ex.map(work, range(8)))
    assert not clash and bad == 0
    assert len(datasets.POOL) <= datasets.POOL.per_file


def test_failed_read_does_not_return_the_dataset(cog_server, sample):
    """A real HTTP failure mid-read (the file is gone: 404): the dataset is closed, not pooled."""
    from affine import Affine

    from tiler.errors import UpstreamError
    from tiler.sample import write_cog

    # noise does not compress: each 512 px block is its own range, not in GDAL's first read
    rng = np.random.default_rng(3)
    data = rng.integers(1, 4000, size=(1, 2048, 2048), dtype="uint16")
    src = sample.path(0, "ms")
    with rasterio.open(src) as ds0:
        t = ds0.transform
    path = src.with_name("POOL_FAILURE_TEST.tif")
    write_cog(path, data, Affine(6.0, 0, t.c, 0, -6.0, t.f), ["noise"])
    href = f"{cog_server.url}/{path.name}"
    clear_http_cache()
    with rasterio.open(path) as ds0:
        (w, s_, e, n) = rasterio.warp.transform_bounds(ds0.crs, "EPSG:4326", *ds0.bounds)
    nw = mercator_tile(w + 0.1 * (e - w), n - 0.1 * (n - s_), 16)
    se = mercator_tile(e - 0.1 * (e - w), s_ + 0.1 * (n - s_), 16)
    try:
        with SigningReader(href) as r:
            ds = r.dataset
            r.tile(*nw, 16)
        assert datasets.POOL.take(href) is ds  # kept, and taken back here
        datasets.POOL.give(href, ds)
        path.unlink()
        with SigningReader(href) as r:
            assert r.dataset is ds
            with pytest.raises(UpstreamError) as e:
                r.tile(*se, 16)  # blocks never read: GDAL asks the host, which answers 404
        assert "POOL_FAILURE_TEST.tif" in str(e.value)  # a clean upstream error naming the file
        assert ds.closed and datasets.POOL.take(href) is None
    finally:
        path.unlink(missing_ok=True)


def test_tiles_through_the_app_take_pooled_datasets(client, sample):
    """Two distinct tiles of one item: the second request opens nothing."""
    x, y, z = _tile_of(sample)
    client.app.state.tile_cache.clear()
    clear_http_cache()
    item = sample.item(0)
    base = f"/collections/{item['collection']}/items/{item['id']}/tiles/WebMercatorQuad"
    q = {"assets": "ms|bidx=3,2,1", "rescale": "0,2000"}
    r = client.get(f"{base}/{z}/{x}/{y}.png", params=q)
    assert r.status_code == 200, r.text
    hits = datasets.POOL.hits
    r = client.get(f"{base}/{z}/{x + 1}/{y}.png", params=q)
    assert r.status_code == 200, r.text
    assert datasets.POOL.hits == hits + 1


def _zlib_flevel(png: bytes) -> int:
    """FLEVEL of the first IDAT's zlib header: 0 fastest (level 0-1), 1 fast, 2 default (6), 3 max."""
    i = png.index(b"IDAT") + 4
    return png[i + 1] >> 6


def test_png_zlib_level_follows_the_setting(client, dsn, sample):
    from fastapi.testclient import TestClient
    from rio_tiler.profiles import img_profiles

    from tests.conftest import make_settings
    from tiler.main import create_app
    from tiler.settings import ReaderSettings

    x, y, z = _tile_of(sample)
    item = sample.item(0)
    url = f"/collections/{item['collection']}/items/{item['id']}/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
    q = {"assets": "ms|bidx=3,2,1", "rescale": "0,1999"}
    r = client.get(url, params=q)
    assert r.status_code == 200 and _zlib_flevel(r.content) == 0  # the default: level 1
    settings = make_settings(dsn)
    settings.reader = ReaderSettings(png_zlevel=6)
    settings.cache.enabled = False
    try:
        with TestClient(create_app(settings)) as c6:
            r6 = c6.get(url, params=q)
        assert r6.status_code == 200 and _zlib_flevel(r6.content) == 2
        assert len(r6.content) < len(r.content)  # same pixels, smaller file
    finally:
        img_profiles.data["png"]["zlevel"] = ReaderSettings().png_zlevel  # what the session app set


ARENAS = """
import ctypes, sys, threading
from tiler.datasets import limit_malloc_arenas
if sys.argv[1] == "2":
    assert limit_malloc_arenas(2)
barrier = threading.Barrier(16)
def work():
    barrier.wait()
    for _ in range(300):
        keep = [bytearray(100_000) for _ in range(10)]
threads = [threading.Thread(target=work) for _ in range(16)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
f = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print(open(sys.argv[2]).read().count("<heap nr="))
"""


def _script_number(script: str, *args: str) -> int:
    """The number a Python ``script`` prints, run in a fresh interpreter (its own malloc state)."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_arenas_are_capped(tmp_path):
    """16 threads allocating at once: glibc makes many arenas, 2 with `limit_malloc_arenas(2)`."""

    def heaps(mode: str) -> int:
        return _script_number(ARENAS, mode, str(tmp_path / f"{mode}.xml"))

    assert heaps("default") > 2
    assert heaps("2") <= 2


MMAP = """
import sys
from tiler.datasets import fix_malloc_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_malloc_mmap_threshold(128)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
b = bytearray(1 << 20)  # mmapped; freeing it raises glibc's dynamic threshold to 1 MiB
del b
base = rss()
keep, big = [], []
for _ in range(200):
    big.append(bytearray(300_000))  # 300 kB buffers (a decoded block, a tile array)
    keep.append(bytearray(1000))  # small, long-lived: pins the heap between them
del big
print((rss() - base) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_fixed_mmap_threshold_gives_large_buffers_back():
    """60 MB of 300 kB buffers freed between small live ones: kept by glibc's default, given back when fixed."""

    def kept_kib(mode: str) -> int:
        return _script_number(MMAP, mode)

    assert kept_kib("default") > 40_000
    assert kept_kib("fixed") < 5_000
