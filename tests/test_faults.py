"""Upstream and database faults: clean JSON answers, no secrets, deadlines, recovery without restart.

The misbehaving COG host is a real server on 127.0.0.1 (`tests/faultserver.py`); items are
re-hosted on it in collections of their own, one fault per item.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from faultserver import FaultServer
from starlette.testclient import TestClient
from titiler.mosaic.factory import MOSAIC_THREADS

from tests.conftest import make_settings, serve_app
from tiler.ingest import load
from tiler.main import create_app
from tiler.settings import ApiSettings, AuthSettings, GdalSettings, Settings

SECRET = "SECRET-TOKEN-123"
UP = "faults-upstream"
MS = {"assets": "ms|bidx=3,2,1", "rescale": "0,2000", "max_size": 64}


def _file(href: str) -> str:
    return href.rsplit("/", 1)[1].split("?", 1)[0]


def _rehost(sample, directory: Path, dsn: str, collection: str, hosts: dict[str, str]) -> dict[str, dict]:
    """Load copies of sample item 0 into ``collection``: id -> href base (all assets), query with a secret."""
    items = []
    for item_id, base in hosts.items():
        it = copy.deepcopy(sample.item(0))
        it["id"], it["collection"] = item_id, collection
        for a in it["assets"].values():
            a["href"] = f"{base}/{_file(a['href'])}?token={SECRET}"
        items.append(it)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "collection.json").write_text(json.dumps(dict(sample.collection, id=collection)))
    (directory / "items.ndjson").write_text("".join(json.dumps(i) + "\n" for i in items))
    load(dsn, [directory / "collection.json", directory / "items.ndjson"], progress=False, stats=False)
    return {it["id"]: it for it in items}


@pytest.fixture(scope="module")
def faulty(sample):
    server = FaultServer(sample.directory)
    server.start_background()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def up_items(dsn, sample, faulty, tmp_path_factory):
    modes = ["ok", "401", "403", "404", "429", "500", "502", "504", "busy", "cut", "flaky", "flaky3", "hang"]
    return _rehost(
        sample, tmp_path_factory.mktemp("up"), dsn, UP, {f"F-{m}": f"{faulty.url}/{m}" for m in modes}
    )


def _no_secret(r, caplog) -> None:
    assert SECRET not in r.text and "token=" not in r.text
    leaked = [rec.getMessage() for rec in caplog.records if SECRET in rec.getMessage()]
    assert not leaked, leaked


@pytest.mark.parametrize(
    ("mode", "status"),
    [
        ("404", 404),
        ("403", 502),
        ("401", 502),
        ("cut", 502),
        ("busy", 503),
        ("429", 503),
        ("500", 502),
        ("502", 502),
        ("504", 502),
    ],
)
def test_upstream_fault_status(client, up_items, faulty, sample, caplog, mode, status):
    caplog.set_level(logging.INFO)
    ms = _file(sample.item(0)["assets"]["ms"]["href"])
    before = len(faulty.requests(mode, ms))
    r = client.get(f"/collections/{UP}/items/F-{mode}/preview.png", params=MS)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert f"F-{mode}/ms" in detail and ms in detail, detail  # names the asset and its file
    _no_secret(r, caplog)
    assert r.headers["cache-control"] == "no-store"
    asked = len(faulty.requests(mode, ms)) - before
    if mode in ("busy", "429", "500", "502", "504"):  # retried by GDAL (GDAL_HTTP_MAX_RETRY=2)
        assert asked == 3, asked
    elif mode != "cut":
        assert asked == 1, asked  # 401/403/404 are not retried
    if status == 503:
        assert r.headers["retry-after"]
    if mode in ("403", "401"):
        assert "credentials" in detail
    # the server is fine afterwards
    ok = client.get(f"/collections/{UP}/items/F-ok/preview.png", params=MS)
    assert ok.status_code == 200, ok.text


def test_upstream_fault_in_mosaic(client, up_items, caplog):
    """A collection mosaic over a refusing host: 502 naming the item and asset, no secret."""
    caplog.set_level(logging.INFO)
    r = client.post(
        "/searches/register",
        json={
            "collections": [UP],
            "filter-lang": "cql2-json",
            "filter": {"op": "=", "args": [{"property": "id"}, "F-403"]},
        },
    )
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    info = client.get(f"/searches/{sid}/WebMercatorQuad/tilejson.json", params={"assets": "ms"}).json()
    z = info["maxzoom"]
    from helpers import lonlat_of_item_centre, mercator_tile

    x, y = mercator_tile(*lonlat_of_item_centre(up_items["F-403"]), z)
    r = client.get(f"/searches/{sid}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params={"assets": "ms"})
    assert r.status_code == 502, r.text
    assert "F-403/ms" in r.json()["detail"]
    _no_secret(r, caplog)


def test_transient_503_is_retried(client, up_items, faulty, sample):
    """503, 503, then 200: GDAL's retries absorb it, the client gets its image."""
    ms = _file(sample.item(0)["assets"]["ms"]["href"])
    r = client.get(f"/collections/{UP}/items/F-flaky/preview.png", params=MS)
    assert r.status_code == 200, r.text
    seen = faulty.requests("flaky", ms)
    print(f"upstream requests for 503,503,200: {len(seen)} (the first 3 for the same open)")
    assert len(seen) >= 3 and faulty.counts[("flaky", ms)] == len(seen)


def test_failure_does_not_poison_later_requests(client, up_items, faulty, sample):
    """Three 503s outlast the retries (503 for the client); the next request asks upstream again."""
    ms = _file(sample.item(0)["assets"]["ms"]["href"])
    r = client.get(f"/collections/{UP}/items/F-flaky3/preview.png", params=MS)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"]
    failed = len(faulty.requests("flaky3", ms))
    assert failed == 3
    r = client.get(f"/collections/{UP}/items/F-flaky3/preview.png", params=MS)
    assert r.status_code == 200, r.text  # GDAL's cached failure was cleared: upstream was asked again
    assert len(faulty.requests("flaky3", ms)) > failed


def _short_app(dsn: str, request_timeout: float, http_timeout: float) -> Settings:
    s = make_settings(dsn)
    return Settings(
        db=s.db,
        auth=AuthSettings(enabled=False),
        api=ApiSettings(request_timeout=request_timeout),
        gdal=GdalSettings(
            gdal_http_timeout=str(http_timeout),
            gdal_http_connecttimeout="1",
            gdal_http_max_retry="0",
            gdal_http_low_speed_time="1",
        ),
    )


def test_gdal_timeouts_must_fit_the_deadline():
    with pytest.raises(ValueError, match="TILER_API_REQUEST_TIMEOUT"):
        Settings(auth=AuthSettings(enabled=False), api=ApiSettings(request_timeout=10))
    s = Settings(
        auth=AuthSettings(enabled=False),
        api=ApiSettings(request_timeout=11),
        gdal=GdalSettings(gdal_http_timeout="3"),
    )
    assert s.gdal.worst_http_seconds() == pytest.approx(3 * 3 + 0.5 + 1.25)


def _warm_up(get, path: str = "/collections/faults-slow/WebMercatorQuad/tilejson.json?assets=ms") -> None:
    """FastAPI builds a router's route state on its first request, in the event loop (1-7 s here)."""
    for _ in range(10):  # may itself run out of time while the routes are being built
        try:
            if get(path).status_code == 200:
                return
        except urllib.error.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("warm-up failed")


def test_upstream_that_never_answers(dsn, up_items, faulty, caplog):
    """A host that accepts and never answers: GDAL gives up after its timeout, 504, bounded."""
    caplog.set_level(logging.INFO)
    with TestClient(create_app(_short_app(dsn, request_timeout=6, http_timeout=1))) as c:
        _warm_up(c.get, f"/collections/{UP}/items/F-ok/info?assets=ms")
        before = len(faulty.requests("hang"))
        t0 = time.monotonic()
        r = c.get(f"/collections/{UP}/items/F-hang/preview.png", params=MS)
        took = time.monotonic() - t0
        n = len(faulty.requests("hang")) - before
        print(
            f"never-answering upstream: {r.status_code} after {took:.2f} s, {n} upstream requests: {r.text}"
        )
        assert r.status_code == 504, r.text
        assert "F-hang/ms" in r.json()["detail"]  # GDAL's timeout, before the request's deadline
        assert took < 6
        _no_secret(r, caplog)
        assert c.get(f"/collections/{UP}/items/F-ok/preview.png", params=MS).status_code == 200


@pytest.fixture(scope="module")
def slow_items(dsn, sample, faulty, tmp_path_factory):
    """Items whose every upstream request takes ``faulty.slow_delay`` (0.5 s); distinct URLs per item."""
    n = MOSAIC_THREADS + 5
    return _rehost(
        sample,
        tmp_path_factory.mktemp("slow"),
        dsn,
        "faults-slow",
        {f"S-{i:02d}": f"{faulty.url}/slow/S-{i:02d}" for i in range(n)},
    )


#: the slow items share one footprint: without these pgstac would return only the first
ALL_ITEMS = {"skipcovered": "false", "exitwhenfull": "false"}


def _items_read(faulty) -> set[str]:
    return {rest.split("/", 1)[0] for _, rest, _, _ in faulty.requests("slow")}


def _tile_of(item, z=15):
    from helpers import lonlat_of_item_centre, mercator_tile

    return (z, *mercator_tile(*lonlat_of_item_centre(item), z))


@contextlib.contextmanager
def _slow_delay(server, seconds: float):
    before, server.slow_delay = server.slow_delay, seconds
    try:
        yield
    finally:
        server.slow_delay = before


def test_deadline_504_frees_the_thread_and_stops_the_mosaic(dsn, sample, slow_items, faulty):
    """504 at the deadline; the render left behind ends within GDAL's timeout and reads no further item.

    Each upstream request takes 0.8 s and an item needs two in a row (header, data), so the
    first chunk of items (read in parallel, `MOSAIC_THREADS`) is still running at the 1.5 s
    deadline. The next chunk must not be read: rio-tiler's threads check the request's budget
    per item.
    """
    app = create_app(_short_app(dsn, request_timeout=1.5, http_timeout=1))
    with TestClient(app) as c, _slow_delay(faulty, 0.8):
        _warm_up(c.get)
        z, x, y = _tile_of(next(iter(slow_items.values())))
        faulty.seen.clear()
        t0 = time.monotonic()
        r = c.get(
            f"/collections/faults-slow/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
            params={"assets": "ms", "pixel_selection": "mean", "rescale": "0,2000", **ALL_ITEMS},
        )
        answered = time.monotonic() - t0
        assert r.status_code == 504, r.text
        assert "deadline" in r.json()["detail"]
        assert r.headers["cache-control"] == "no-store"
        assert 1.4 < answered < 2.5
        while app.state.late_requests and time.monotonic() - t0 < 20:
            time.sleep(0.02)
        released = time.monotonic() - t0 - answered
        last_upstream = max(t for *_, t in faulty.requests("slow")) - t0
        read = _items_read(faulty)
        print(
            f"deadline 1.5 s: 504 after {answered:.2f} s; thread released {released:.2f} s after the 504; "
            f"{len(read)} of {len(slow_items)} items read (chunk {MOSAIC_THREADS}); "
            f"last upstream request at {last_upstream:.2f} s"
        )
        assert not app.state.late_requests
        assert released < 2.0  # bounded by GDAL_HTTP_TIMEOUT (1 s) per request in flight
        assert len(read) <= MOSAIC_THREADS < len(slow_items)
        time.sleep(0.6)
        assert max(t for *_, t in faulty.requests("slow")) - t0 == pytest.approx(last_upstream)
        # the worker serves the next request normally
        _warm_up(c.get, f"/collections/{sample.collection['id']}/items/{sample.item(1)['id']}/info?assets=ms")


def test_client_disconnect_stops_the_mosaic(dsn, slow_items, faulty):
    """A client that hangs up: the mosaic render stops before the next chunk of items (real uvicorn)."""
    with serve_app(create_app(make_settings(dsn))) as (base, port):

        def get(path):
            with urllib.request.urlopen(base + path, timeout=10) as resp:
                resp.status_code = resp.status
                return resp

        _warm_up(get)
        z, x, y = _tile_of(next(iter(slow_items.values())))
        faulty.seen.clear()
        with socket.create_connection(("127.0.0.1", port)) as s:
            path = (
                f"/collections/faults-slow/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
                "?assets=ms&pixel_selection=mean&rescale=0,2000&skipcovered=false&exitwhenfull=false"
            )
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            time.sleep(0.5)
        time.sleep(4)  # the first chunk ends (a few 0.5 s requests per item); no chunk follows
        read = _items_read(faulty)
        print(f"client gone after 0.5 s: {len(read)} of {len(slow_items)} items read")
        assert 0 < len(read) <= MOSAIC_THREADS


# --------------------------------------------------------------------------- database


def test_database_outage_is_503_then_recovers(own_cluster, sample):
    s = make_settings(own_cluster.dsn)
    s.db.pool_timeout = 2.0
    app = create_app(s)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        own_cluster.stop(mode="immediate")

        t0 = time.monotonic()
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["database_online"] is False
        # a request needing the catalogue fails cleanly and quickly (not 500, no hang)
        r = c.get(
            "/collections/spot67-demo/tiles/WebMercatorQuad/15/1/1.png",
            params={"assets": "ms", "datetime": "2024-01-01T00:00:00Z/.."},
        )
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after")
        assert own_cluster.password not in r.text
        assert time.monotonic() - t0 < 15

        own_cluster.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/healthz").status_code != 200:
            time.sleep(0.2)
        assert c.get("/healthz").status_code == 200
        r = c.post("/searches/register", json={"collections": ["spot67-demo"]})
        assert r.status_code == 200


def test_pool_wait_never_exceeds_pool_timeout(dsn, sample):
    """All connections busy: 503 with Retry-After after the pool timeout, not after titiler-pgstac's retries."""
    s = make_settings(dsn)
    s.db.max_conn, s.db.min_conn, s.db.pool_timeout = 1, 1, 1.0
    app = create_app(s)
    with TestClient(app) as c:
        warm = c.get(
            "/collections/spot67-demo/tiles/WebMercatorQuad/15/1/1.png",
            params={"assets": "ms", "datetime": "2021-01-01T00:00:00Z/.."},
        )
        assert warm.status_code == 204, warm.text
        held = app.state.dbpool.getconn()
        try:
            t0 = time.monotonic()
            r = c.get(
                "/collections/spot67-demo/tiles/WebMercatorQuad/15/1/1.png",
                params={"assets": "ms", "datetime": "2020-01-01T00:00:00Z/.."},
            )
            took = time.monotonic() - t0
        finally:
            app.state.dbpool.putconn(held)
        print(f"pool exhausted: {r.status_code} after {took:.2f} s (pool timeout 1 s)")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert took < 1.8  # titiler-pgstac retries 3 times: 4 s without the per-request allowance
        assert c.post("/searches/register", json={"collections": ["spot67-demo"]}).status_code == 200


def _hammer(base: str, paths: list[str], stop: threading.Event, log: list) -> None:
    i = 0
    while not stop.is_set():
        path = paths[i % len(paths)]
        i += 1
        t = time.monotonic()
        try:
            req = urllib.request.Request(base + path)
            if path.startswith("/searches/register"):
                req = urllib.request.Request(
                    base + "/searches/register",
                    data=json.dumps(
                        {"collections": ["spot67-demo"], "bbox": [3.0, 43.0, 4.0 + i % 7, 44.0]}
                    ).encode(),
                    headers={"Content-Type": "application/json"},
                )
            with urllib.request.urlopen(req, timeout=30) as resp:
                code, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            code, body = e.code, e.read()
        except OSError as e:
            code, body = 0, str(e).encode()
        log.append((t, time.monotonic(), code, body[:300]))


#: titiler-pgstac caches a collection's search id per process: a datetime no other test uses keeps
#: this cluster's search ids out of the shared cluster's way
OWN = "&datetime=1999-01-01T00:00:00Z/.."


def test_database_restart_under_load(own_cluster, sample):
    """PostgreSQL stopped and started while 4 clients request tiles, TileJSON and searches.

    Errors are 503 (never 500) and stop within 10 s of the database being back, without
    restarting the worker.
    """
    s = make_settings(own_cluster.dsn)
    s.db.pool_timeout = 2.0
    z, x, y = _tile_of(sample.item(0), 14)
    paths = [
        f"/collections/spot67-demo/tiles/WebMercatorQuad/{z}/{x}/{y}.png?assets=ms%7Cbidx=3,2,1&rescale=0,2000{OWN}",
        f"/collections/spot67-demo/WebMercatorQuad/tilejson.json?assets=ms{OWN}",
        "/searches/register",
        f"/collections/spot67-demo/items/{sample.item(1)['id']}/info?assets=ms",
    ]
    stop, log = threading.Event(), []
    with serve_app(create_app(s)) as (base, _):
        clients = [
            threading.Thread(target=_hammer, args=(base, paths[i:] + paths[:i], stop, log)) for i in range(4)
        ]
        try:
            for t in clients:
                t.start()
            time.sleep(2)
            t_stop = time.monotonic()
            own_cluster.stop(mode="fast")
            time.sleep(3)
            own_cluster.start()
            t_back = time.monotonic()
            time.sleep(12)
        finally:
            stop.set()
            for t in clients:
                t.join(35)
    assert log and all(t_end < t_back + 15 + 31 for _, t_end, _, _ in log)
    codes = {}
    for _, _, code, _ in log:
        codes[code] = codes.get(code, 0) + 1
    errors = [(t0, t1, code) for t0, t1, code, _ in log if code != 200]
    bad = [(code, body) for _, _, code, body in log if code not in (200, 503)]
    assert not bad, bad[:3]
    assert errors, "the outage was not noticed"
    first_err = min(t1 for _, t1, _ in errors)
    last_err = max(t1 for _, t1, _ in errors)
    last_err_sent = max(t0 for t0, _, _ in errors)
    first_ok = min(t1 for t0, t1, code, _ in log if code == 200 and t0 > t_back)
    print(
        f"restart under load: {len(log)} requests {codes}; database down {t_back - t_stop:.1f} s; "
        f"errors answered from {first_err - t_stop:+.2f} s to {last_err - t_stop:+.2f} s after the stop; "
        f"after the database was back: first 200 at {first_ok - t_back:+.2f} s, last failing request "
        f"sent at {last_err_sent - t_back:+.2f} s and answered at {last_err - t_back:+.2f} s"
    )
    for t0, t1, code, body in sorted(log):
        if t1 - t0 > 1:
            print(f"  slow: sent {t0 - t_stop:+.2f} s, took {t1 - t0:.2f} s, {code} {body[:80]!r}")
    assert last_err - t_back < 10
    assert len([1 for t0, _, code, _ in log if code == 200 and t0 > last_err]) > 20


def test_connection_budget_checked_at_start(dsn, caplog):
    """(max_conn + the STAC API's pool) x workers x replicas above max_connections: a warning, or no start when strict."""
    s = make_settings(dsn)
    s.db.max_conn, s.db.workers, s.db.replicas = 20, 4, 3  # (20 + 4) x 4 x 3 = 288 > 200 - 3
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(s)) as c:
        assert c.get("/livez").status_code == 200
    msgs = [r.getMessage() for r in caplog.records if "connection budget" in r.getMessage()]
    assert msgs and "288" in msgs[0] and "197" in msgs[0] and "TILER_STAC_MAX_CONN=4" in msgs[0], msgs
    s.db.strict_budget = True
    with pytest.raises(RuntimeError, match="TILER_DB_MAX_CONN"):
        with TestClient(create_app(s)):
            pass
    s.db.replicas = 1  # 96 fits
    with TestClient(create_app(s)) as c:
        assert c.get("/livez").status_code == 200


@pytest.mark.parametrize(
    ("message", "status"),
    [
        ("HTTP response code: 404", 404),
        ("'/vsicurl/https://h/x.tif?sig=abc' does not exist in the file system", 404),
        ("HTTP response code: 403", 502),
        ("HTTP response code: 429", 503),
        ("HTTP response code: 500", 502),
        ("CURL error: Operation timed out after 1002 milliseconds with 0 bytes received", 504),
        ("CURL error: Failed to connect to h port 443: Connection refused", 502),
        ("Read failed. See previous exception for details.", 502),
    ],
)
def test_classify_upstream_messages(message, status):
    from rasterio.errors import RasterioIOError

    from tiler.errors import STATUS_CODES, classify_upstream

    err = classify_upstream(RasterioIOError(message), "ITEM/ms (x.tif)")
    assert STATUS_CODES[type(err)] == status
    assert "ITEM/ms (x.tif)" in str(err) and "sig=" not in str(err) and "https://" not in str(err)
