"""Assets of known size (`file:size`) read through `tiler.opener`: a cold tile is 2 GETs, no HEAD.

The COGs are served by a real range server on 127.0.0.1 that records every request
(method, file, Range). Each case is rendered cold through the app with the opener and
with GDAL's /vsicurl/ (the opener turned off): same pixels, fewer requests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from fastapi.testclient import TestClient
from faultserver import FaultServer
from prometheus_client import REGISTRY

from tests.conftest import make_settings
from tests.helpers import (
    NGINX,
    copy_items,
    expected_nearest,
    lonlat_of_item_centre,
    mercator_tile,
    mercator_tile_centres,
    read_tif,
    run_nginx,
)
from tiler import opener
from tiler.ingest import load
from tiler.main import create_app
from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler
from tiler.settings import GdalSettings, ReaderSettings
from tiler.upstream import clear_http_cache, opens_known_size

C = "opener-c"
GONE = "opener-gone"
FLAKY = "opener-flaky"
WRONG = "opener-wrong-size"


class Logged(RangeRequestHandler):
    """Records (method, file name, Range) of every request."""

    def _serve(self, body: bool) -> None:
        self._record()
        super()._serve(body)

    def _record(self) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.log.append((self.command, self.path.rsplit("/", 1)[-1], self.headers.get("Range")))  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def origin(dsn, sample, tmp_path_factory):
    server = RangeHTTPServer(sample.directory, handler_class=Logged)
    server.log = []
    server.lock = threading.Lock()
    server.start_background()

    def rehost(base: str, gone: bool = False, wrong: bool = False):
        def mutate(items):
            for it in items:
                it["id"] = f"{it['id']}-GONE" if gone else it["id"]
                for name, a in it["assets"].items():
                    file = "GONE_MS.tif" if gone and name == "ms" else a["href"].rsplit("/", 1)[1]
                    a["href"] = f"{base}/{file}" + ("?stale=1" if wrong else "")
                    if wrong:
                        a["file:size"] += 1000  # a catalogue out of date with its storage

        return mutate

    load(dsn, copy_items(sample, tmp_path_factory.mktemp("opener"), C, rehost(server.url)), progress=False)
    # the same scenes whose MS files are gone from the storage (their STAC still gives a size)
    load(
        dsn,
        copy_items(sample, tmp_path_factory.mktemp("gone"), GONE, rehost(server.url, gone=True)),
        progress=False,
    )
    load(
        dsn,
        copy_items(sample, tmp_path_factory.mktemp("wrong"), WRONG, rehost(server.url, wrong=True)),
        progress=False,
    )
    clear_http_cache(server.url)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def faulty(dsn, sample, tmp_path_factory):
    """A fault server (tests/faultserver.py) whose /flaky/ files answer 503 twice, then serve."""
    server = FaultServer(sample.directory)
    server.start_background()

    def mutate(items):
        for it in items:
            for a in it["assets"].values():
                a["href"] = f"{server.url}/flaky/" + a["href"].rsplit("/", 1)[1]

    load(dsn, copy_items(sample, tmp_path_factory.mktemp("flaky"), FLAKY, mutate), progress=False)
    clear_http_cache(server.url)  # the ingest read them (statistics): the tiles start cold,
    with server.lock:
        server.counts.clear()  # and each file fails twice again
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def app_client(dsn, origin):
    with TestClient(create_app(make_settings(dsn))) as c:
        yield c


@pytest.fixture()
def vsicurl(monkeypatch):
    """Turn the opener off (as TILER_READER_KNOWN_SIZE_OPENER=false) for the test's duration."""

    def off(flag: bool = True) -> None:
        monkeypatch.setattr(opener.CONFIG, "enabled", not flag)

    return off


def _cold(client, origin, url: str, params: dict) -> tuple[object, list]:
    client.app.state.tile_cache.clear()
    clear_http_cache(origin.url)
    origin.log.clear()
    r = client.get(url, params=params)
    assert r.status_code == 200, r.text
    return r, list(origin.log)


def _item(sample, i: int) -> str:
    return f"/collections/{C}/items/{sample.item(i)['id']}"


def _centre_tile(sample, i: int, z: int) -> tuple[int, int]:
    return mercator_tile(*lonlat_of_item_centre(sample.item(i)), z)


def test_the_setting_turns_the_opener_off(dsn, origin):
    s = make_settings(dsn)
    s.reader = ReaderSettings(known_size_opener=False)
    try:
        create_app(s)
        assert opener.CONFIG.enabled is False
    finally:
        create_app(make_settings(dsn))
    assert opener.CONFIG.enabled is True


def test_a_rasterio_without_the_opener_internals_falls_back_to_vsicurl(monkeypatch, caplog):
    monkeypatch.setattr(opener, "SUPPORTED", False)
    try:
        with caplog.at_level("WARNING", logger="tiler.opener"):
            opener.configure(GdalSettings(), enabled=True)
        assert opener.CONFIG.enabled is False
        assert "/vsicurl/" in caplog.text
        assert not opens_known_size("http://127.0.0.1/a.tif", 1000)
    finally:
        monkeypatch.undo()
        opener.configure(GdalSettings(), enabled=True)
    assert opener.CONFIG.enabled is True and opens_known_size("http://127.0.0.1/a.tif", 1000)


def test_cold_tile_is_two_gets_and_no_head(app_client, origin, sample, vsicurl):
    """Item MS z15: the header in one GET (from byte 0), the data in one GET; /vsicurl/ adds a HEAD."""
    z = 15
    x, y = _centre_tile(sample, 0, z)
    url = f"{_item(sample, 0)}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif"
    host = origin.url.removeprefix("http://")

    def count(method: str) -> float:
        return (
            REGISTRY.get_sample_value("tiler_origin_requests_total", {"host": host, "method": method}) or 0.0
        )

    before = count("GET"), count("HEAD")
    r, log = _cold(app_client, origin, url, {"assets": "ms"})
    ms = sample.item(0)["assets"]["ms"]
    print(f"\nopener, cold item MS z15: {log}")
    assert [m for m, *_ in log] == ["GET", "GET"], log
    assert {f for _, f, _ in log} == {Path(ms["href"]).name}
    header = log[0][2]
    assert header == f"bytes=0-{max(ms['file:header_size'], 32768) - 1}"
    # counted in the origin metrics (GDAL's statistics never see the opener's requests)
    assert count("GET") - before[0] == 2 and count("HEAD") == before[1]
    # pixels: the source COG sampled with numpy at the tile's pixel centres
    data, valid = read_tif(r.content)
    xs, ys = mercator_tile_centres(x, y, z)
    want, want_valid = expected_nearest(sample.path(0, "ms"), xs, ys)
    both = valid & want_valid
    assert both.mean() > 0.9 and (valid == want_valid).mean() > 0.97
    assert np.all(data[:, both] == want[:, both], axis=0).mean() > 0.97  # as test_items: pixel-centre ties

    vsicurl()
    r2, log2 = _cold(app_client, origin, url, {"assets": "ms"})
    print(f"/vsicurl/, same tile: {log2}")
    assert [m for m, *_ in log2] == ["HEAD", "GET", "GET"], log2
    assert r2.content == r.content


def _cases(sample) -> dict[str, tuple[str, dict]]:
    x15, y15 = _centre_tile(sample, 0, 15)
    x17, y17 = _centre_tile(sample, 0, 17)
    x10, y10 = _centre_tile(sample, 0, 10)
    # a mosaic tile where scenes 0 and 1 overlap (their centres are ~1 km apart)
    lon0, lat0 = lonlat_of_item_centre(sample.item(0))
    lon1, lat1 = lonlat_of_item_centre(sample.item(1))
    xm, ym = mercator_tile((lon0 + lon1) / 2, (lat0 + lat1) / 2, 14)
    item = _item(sample, 0)
    xb, yb = _tile_over_two_block_rows(sample)
    return {
        "item MS z15": (f"{item}/tiles/WebMercatorQuad/15/{x15}/{y15}.tif", {"assets": "ms"}),
        "item pan z17": (f"{item}/tiles/WebMercatorQuad/17/{x17}/{y17}.tif", {"assets": "pan"}),
        "mosaic MS z14": (f"/collections/{C}/tiles/WebMercatorQuad/14/{xm}/{ym}.tif", {"assets": "ms"}),
        "low zoom item MS z10": (f"{item}/tiles/WebMercatorQuad/10/{x10}/{y10}.tif", {"assets": "ms"}),
        "pansharpened z17": (f"{item}/tiles/WebMercatorQuad/17/{x17}/{y17}.tif", {"preset": "pansharpened"}),
        "pan z17 over two block rows": (f"{item}/tiles/WebMercatorQuad/17/{xb}/{yb}.tif", {"assets": "pan"}),
    }


def _byte_set(log: list, sizes: dict[str, int]) -> set[tuple[str, int]]:
    """The (file, 16 KiB chunk) pairs the logged GETs transferred."""
    out = set()
    for _, f, rng in log:
        for spec in (rng or f"bytes=0-{sizes[f] - 1}").removeprefix("bytes=").split(","):
            a, b = (int(v) for v in spec.split("-"))
            out |= {(f, c) for c in range(a // opener.CHUNK, b // opener.CHUNK + 1)}
    return out


@pytest.mark.parametrize("multirange", [True, False], ids=["multirange", "one-GET-per-run"])
@pytest.mark.parametrize(
    "case",
    [
        "item MS z15",
        "item pan z17",
        "mosaic MS z14",
        "low zoom item MS z10",
        "pansharpened z17",
        "pan z17 over two block rows",
    ],
)
def test_same_pixels_as_vsicurl_with_fewer_requests(
    app_client, origin, sample, vsicurl, monkeypatch, case, multirange
):
    monkeypatch.setattr(opener.CONFIG, "multirange", multirange)
    url, params = _cases(sample)[case]
    r, log = _cold(app_client, origin, url, params)
    vsicurl()
    r2, log2 = _cold(app_client, origin, url, params)
    data, valid = read_tif(r.content)
    data2, valid2 = read_tif(r2.content)
    assert valid.any()
    assert np.array_equal(valid, valid2) and np.array_equal(data, data2), case
    files = {f for _, f, _ in log2}
    print(f"\n{case}: opener {len(log)} requests, /vsicurl/ {len(log2)} ({len(files)} files): {log}")
    assert not [e for e in log if e[0] != "GET"], log
    # the same 16 KiB chunks of the same files (GDAL's multi-range GETs are not chunk-aligned)
    sizes = {Path(p).name: Path(p).stat().st_size for p in sample.directory.iterdir()}
    assert _byte_set(log, sizes) == _byte_set([e for e in log2 if e[0] == "GET"], sizes)
    if not multirange:
        assert len(log) == len(log2) - len(files), (log, log2)  # one HEAD less per file, the GETs as many
    else:  # the origin serves multi-range GETs: the header, then all of a tile's blocks in one GET per file
        assert all(sum(f == g for _, g, _ in log) <= 2 for f in files), log
        assert len(log) <= len(log2) - len(files)


def _tiles_inside(item: dict, z: int) -> list[tuple[int, int]]:
    """The tiles of zoom ``z`` whose centre is in the inner half of the item's bbox."""
    w, s, e, n = item["bbox"]
    dx, dy = (e - w) / 4, (n - s) / 4
    x0, y0 = mercator_tile(w + dx, n - dy, z)
    x1, y1 = mercator_tile(e - dx, s + dy, z)
    return [(x, y) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)]


def test_warm_tiles_make_no_more_requests_than_vsicurl(app_client, origin, sample, vsicurl):
    """A run of neighbouring tiles (the pan at z17, the MS at z16), then the same run again."""
    runs = {}
    for flag in (False, True):
        vsicurl(flag)
        counts = []
        app_client.app.state.tile_cache.clear()
        clear_http_cache(origin.url)
        for asset, z in (("pan", 17), ("ms", 16)):
            tiles = _tiles_inside(sample.item(0), z)
            assert len(tiles) >= 4
            for _ in range(2):  # cold then warm
                app_client.app.state.tile_cache.clear()
                origin.log.clear()
                for x, y in tiles:
                    r = app_client.get(
                        f"{_item(sample, 0)}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif", params={"assets": asset}
                    )
                    assert r.status_code == 200, r.text
                counts.append(
                    len([e for e in origin.log if e[0] == "GET"])
                    + len([e for e in origin.log if e[0] == "HEAD"])
                )
        runs["vsicurl" if flag else "opener"] = counts
    print(f"\nrequests (pan first pass, pan again, MS first pass, MS again): {runs}")
    assert all(o <= v for o, v in zip(runs["opener"], runs["vsicurl"], strict=True)), runs
    assert runs["opener"][0] < runs["vsicurl"][0] and runs["opener"][2] < runs["vsicurl"][2]  # no HEAD
    assert runs["opener"][1] == runs["opener"][3] == 0  # the second pass reads from the caches


def test_multi_range_reads_merge_touching_ranges_only(origin, sample, monkeypatch):
    """Touching ranges are one GET, a gap is never fetched; bytes are the file's."""
    monkeypatch.setattr(opener.CONFIG, "multirange", False)
    path = sample.path(0, "pan")
    body = path.read_bytes()
    href = f"{origin.url}/{path.name}"
    clear_http_cache(origin.url)
    op = opener.KnownSizeOpener(href, len(body), 1000)
    f = op.open(href)
    a, far = len(body) // 4, len(body) // 4 * 3
    assert far - a > 20 * opener.CHUNK
    offsets, sizes = [a, a + 20_000, far], [20_000, 15_000, 10_000]
    origin.log.clear()
    got = f.get_byte_ranges(offsets, sizes)
    assert got == [body[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
    ranges = sorted(int(r.split("=")[1].split("-")[0]) for m, _, r in origin.log)
    assert len(origin.log) == 2, origin.log  # [a, a+35000) in one GET, the far range in another
    chunk = opener.CHUNK
    assert ranges == [a // chunk * chunk, far // chunk * chunk]
    fetched = sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for _, _, r in origin.log)
    assert fetched < 4 * chunk + 35_000 + 10_000  # nothing of the gap
    origin.log.clear()
    assert f.get_byte_ranges(offsets, sizes) == got and origin.log == []  # cached
    f.seek(a + 100)
    assert f.read(50) == body[a + 100 : a + 150] and origin.log == []

    # the same read, cold, from an origin that serves multi-range GETs: one GET with both runs
    monkeypatch.setattr(opener.CONFIG, "multirange", True)
    clear_http_cache(origin.url)
    f = opener.KnownSizeOpener(href, len(body), 1000).open(href)
    origin.log.clear()
    assert f.get_byte_ranges(offsets, sizes) == got
    assert len(origin.log) == 1, origin.log
    chunk = opener.CHUNK
    assert origin.log[0][2] == (
        f"bytes={a // chunk * chunk}-{(a + 34_999) // chunk * chunk + chunk - 1},"
        f"{far // chunk * chunk}-{(far + 9_999) // chunk * chunk + chunk - 1}"
    )
    assert origin.url not in opener.NO_MULTIRANGE


class FirstRangeOnly(Logged):
    """A storage that answers a multi-range GET with its first range only (a single 206)."""

    def _serve(self, body: bool) -> None:
        self._record()
        rng = self.headers.get("Range") or ""
        if "," in rng:
            del self.headers["Range"]
            self.headers["Range"] = rng.split(",", 1)[0]
        RangeRequestHandler._serve(self, body)


class WholeFile(Logged):
    """A storage that ignores a multi-range Range header: 200 and the whole file."""

    def _serve(self, body: bool) -> None:
        self._record()
        if "," in (self.headers.get("Range") or ""):
            del self.headers["Range"]
        RangeRequestHandler._serve(self, body)


class NoMultiRange(Logged):
    """A storage that refuses a multi-range GET: 416."""

    def _serve(self, body: bool) -> None:
        self._record()
        if "," in (self.headers.get("Range") or ""):
            self.send_error(416)
            return
        RangeRequestHandler._serve(self, body)


@pytest.mark.parametrize("handler", [FirstRangeOnly, WholeFile, NoMultiRange])
def test_a_storage_without_multi_range_gets_one_get_per_run(sample, handler):
    """The multi-range GET fails once per host (nothing of its answer kept, no whole file read), then one GET per run."""
    server = RangeHTTPServer(sample.directory, handler_class=handler)
    server.log, server.lock = [], threading.Lock()
    server.start_background()
    try:
        path = sample.path(0, "pan")
        body = path.read_bytes()
        href = f"{server.url}/{path.name}"
        host = server.url.removeprefix("http://")
        offsets, sizes = [len(body) // 4, len(body) // 4 * 3], [20_000, 10_000]
        want = [body[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
        received = REGISTRY.get_sample_value("tiler_origin_bytes_total", {"host": host}) or 0.0
        f = opener.KnownSizeOpener(href, len(body), 1000).open(href)
        assert f.get_byte_ranges(offsets, sizes) == want
        assert [("," in r) for _, _, r in server.log] == [True, False, False], server.log
        assert server.url in opener.NO_MULTIRANGE
        got = (REGISTRY.get_sample_value("tiler_origin_bytes_total", {"host": host}) or 0.0) - received
        assert got < 4 * opener.CHUNK + sum(sizes) + 70_000  # never the whole file (%d bytes)
        # remembered for the host: another file is read with one GET per run straight away
        ms = sample.path(0, "ms").read_bytes()
        server.log.clear()
        href2 = f"{server.url}/{sample.path(0, 'ms').name}"
        f2 = opener.KnownSizeOpener(href2, len(ms), 1000).open(href2)
        o2 = [len(ms) // 4, len(ms) // 4 * 3]
        assert f2.get_byte_ranges(o2, [5000, 5000]) == [ms[o : o + 5000] for o in o2]
        assert [("," in r) for _, _, r in server.log] == [False, False], server.log
    finally:
        opener.NO_MULTIRANGE.discard(server.url)
        server.shutdown()


def _tile_over_two_block_rows(sample, z: int = 17) -> tuple[int, int]:
    """A tile of item 0 whose pan pixels straddle two rows of 512 px blocks (two runs of the file)."""
    from pyproj import Transformer

    with rasterio.open(sample.path(0, "pan")) as src:
        block_rows, inverse, crs = src.block_shapes[0][0], ~src.transform, src.crs
    to_src = Transformer.from_crs("EPSG:3857", crs, always_xy=True)
    for x, y in _tiles_inside(sample.item(0), z):
        xs, ys = mercator_tile_centres(x, y, z)
        _, rows = inverse * to_src.transform(xs.ravel(), ys.ravel())
        if int(rows.min()) // block_rows != int(rows.max()) // block_rows:
            return x, y
    raise AssertionError("no tile over two block rows")


def test_cold_tile_over_two_block_rows_is_two_gets_from_nginx(dsn, sample, tmp_path_factory, vsicurl):
    """A real nginx (multipart/byteranges): the pan z17 tile needs two runs of blocks: header + 1 GET."""
    if NGINX is None:
        pytest.skip("nginx")
    d = tmp_path_factory.mktemp("nginx-multirange")
    with run_nginx(d, sample.directory) as (base, access):

        def mutate(items):
            for it in items:
                for a in it["assets"].values():
                    a["href"] = f"{base}/" + a["href"].rsplit("/", 1)[1]

        load(dsn, copy_items(sample, d, "opener-nginx", mutate), progress=False, stats=False)
        x, y = _tile_over_two_block_rows(sample)
        url = f"/collections/opener-nginx/items/{sample.item(0)['id']}/tiles/WebMercatorQuad/17/{x}/{y}.tif"
        with TestClient(create_app(make_settings(dsn))) as client:

            def cold() -> tuple[bytes, list[str]]:
                client.app.state.tile_cache.clear()
                clear_http_cache(base)
                start = len(access.read_text().splitlines()) if access.exists() else 0
                r = client.get(url, params={"assets": "pan"})
                assert r.status_code == 200, r.text
                time.sleep(0.2)  # nginx writes the line after the answer
                return r.content, access.read_text().splitlines()[start:]

            tile, lines = cold()
            print(f"\nnginx, cold pan z17 tile: {lines}")
            assert len(lines) == 2 and all(ln.startswith("GET ") and ln.endswith(" 206") for ln in lines), (
                lines
            )
            assert '"bytes=0-' in lines[0] and lines[1].count(",") >= 1, lines  # header; the runs in one GET
            assert base not in opener.NO_MULTIRANGE
            vsicurl()
            ref, ref_lines = cold()
            assert len(ref_lines) == 4 and ref_lines[0].startswith("HEAD "), ref_lines
            data, valid = read_tif(tile)
            want, want_valid = read_tif(ref)
            assert valid.any() and np.array_equal(valid, want_valid) and np.array_equal(data, want)


def test_chunk_cache_is_bounded():
    cache = opener.ChunkCache(max_bytes=3 * opener.CHUNK)
    cache.put("f", 0, bytes(5 * opener.CHUNK))
    assert len(cache) == 3 and cache.nbytes == 3 * opener.CHUNK
    assert set(cache.get("f", 0, 4)) == {2, 3, 4}  # least recently used out first
    cache.discard("f")
    assert len(cache) == 0 and cache.nbytes == 0


def test_missing_file_is_a_clean_404_naming_it(app_client, origin, sample):
    z = 15
    x, y = _centre_tile(sample, 0, z)
    item = f"{sample.item(0)['id']}-GONE"
    app_client.app.state.tile_cache.clear()
    origin.log.clear()
    r = app_client.get(
        f"/collections/{GONE}/items/{item}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params={"assets": "ms"}
    )
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert (
        f"{item}/ms" in detail
        and "GONE_MS.tif" in detail
        and "http" not in detail
        and "127.0.0.1" not in detail
    )
    assert [m for m, f, _ in origin.log if f == "GONE_MS.tif"] == ["GET"]  # 404 is not retried, no HEAD
    # the pan of the same item is there: a clean tile
    r = app_client.get(
        f"/collections/{GONE}/items/{item}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params={"assets": "pan"}
    )
    assert r.status_code == 200, r.text


def test_503_then_ok_is_retried_as_gdal_would(app_client, faulty, sample):
    """503, 503, then the file: GDAL_HTTP_MAX_RETRY=2 absorbs it; 2 retries of the header GET, no HEAD."""
    z = 15
    x, y = _centre_tile(sample, 0, z)
    ms = Path(sample.item(0)["assets"]["ms"]["href"]).name
    app_client.app.state.tile_cache.clear()
    url = f"/collections/{FLAKY}/items/{sample.item(0)['id']}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif"
    before = len(faulty.requests("flaky", ms))
    r = app_client.get(url, params={"assets": "ms"})
    assert r.status_code == 200, r.text
    ranges = [rng for _, _, rng, _ in faulty.requests("flaky", ms)[before:]]
    print(f"\n503, 503, then OK: {ranges}")
    assert len(ranges) == 4 and len(set(ranges[:3])) == 1 and ranges[0].startswith("bytes=0-"), ranges
    clear_http_cache()
    ref = app_client.get(f"{_item(sample, 0)}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif", params={"assets": "ms"})
    assert r.content == ref.content


def test_concurrent_cold_reads_from_many_threads(origin, sample):
    """Threads opening, reading and closing datasets of 6 files at once (pool on): the tiles of /vsicurl/."""
    from concurrent.futures import ThreadPoolExecutor

    from tiler.upstream import SigningReader

    options = GdalSettings().options()
    jobs = []
    for i, it in enumerate(sample.items):
        for name, z in (("ms", 15), ("pan", 16)):
            a = it["assets"][name]
            href = f"{origin.url}/{Path(a['href']).name}"
            x, y = _centre_tile(sample, i, z)
            jobs.append((href, a["file:size"], a["file:header_size"], (x, y, z)))

    def read(job, known: bool):
        href, size, header, tile = job
        kw = {"file_size": size, "header_size": header} if known else {}
        with rasterio.Env(**options), SigningReader(href, budget=None, **kw) as r:  # as the app's reads
            assert (r._opener is not None) == known
            img = r.tile(*tile)
        return img.array.data, img.array.mask

    clear_http_cache(origin.url)
    want = [read(job, known=False) for job in jobs]
    with ThreadPoolExecutor(12) as pool:
        for _ in range(3):
            clear_http_cache(origin.url)  # cold again: every thread opens, the pool closes
            got = list(pool.map(lambda j: read(j, known=True), jobs * 4))
            for (data, mask), (wdata, wmask) in zip(got, want * 4, strict=True):
                assert np.array_equal(data, wdata) and np.array_equal(mask, wmask)


def test_a_wrong_file_size_falls_back_to_vsicurl(app_client, origin, sample, caplog):
    """file:size out of date: the header GET shows it (Content-Range), the file is read by /vsicurl/."""
    z = 15
    x, y = _centre_tile(sample, 0, z)
    tile = f"/tiles/WebMercatorQuad/{z}/{x}/{y}.tif"
    r, log = _cold(
        app_client, origin, f"/collections/{WRONG}/items/{sample.item(0)['id']}{tile}", {"assets": "ms"}
    )
    assert [m for m, *_ in log] == ["GET", "HEAD", "GET", "GET"], (
        log
    )  # the opener's header GET, then /vsicurl/
    assert any("file:size" in rec.getMessage() and "vsicurl" in rec.getMessage() for rec in caplog.records)
    ref, _ = _cold(app_client, origin, f"{_item(sample, 0)}{tile}", {"assets": "ms"})
    assert r.content == ref.content
    _, log = _cold(
        app_client, origin, f"/collections/{WRONG}/items/{sample.item(0)['id']}{tile}", {"assets": "ms"}
    )
    assert [m for m, *_ in log] == ["HEAD", "GET", "GET"], log  # remembered: no wasted GET


def test_the_demo_range_server_answers_multi_range_as_nginx(origin, sample, tmp_path_factory):
    """tiler.rangeserver (the demo's storage) and a real nginx: the same parts for the same Range values."""
    import httpx

    path = sample.path(0, "pan")
    body = path.read_bytes()
    n = len(body)
    with run_nginx(tmp_path_factory.mktemp("nginx-parts"), sample.directory) as (base, _):
        for value in (
            f"bytes=0-99,{n // 2}-{n // 2 + 999},-50",
            f"bytes=10-19,{n - 5}-{n + 100}",
            "bytes=5-9",
        ):
            answers = [httpx.get(f"{b}/{path.name}", headers={"Range": value}) for b in (origin.url, base)]
            assert [a.status_code for a in answers] == [206, 206], value
            if "," not in value:
                assert answers[0].content == answers[1].content == body[5:10]
                continue
            parts = [opener._byteranges(a.headers["content-type"], a.content) for a in answers]
            assert parts[0] is not None and parts[0] == parts[1], value
            assert all(data == body[first : first + len(data)] for first, data in parts[0].items())
        bad = [
            httpx.get(f"{b}/{path.name}", headers={"Range": f"bytes={n}-{n + 9},{n + 20}-"})
            for b in (origin.url, base)
        ]
        assert [a.status_code for a in bad] == [416, 416]
        assert bad[0].headers["content-range"] == bad[1].headers["content-range"] == f"bytes */{n}"
