"""Observability: Prometheus metrics, JSON access logs with request ids, Server-Timing, render limit."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from titiler.pgstac import backend as titiler_pgstac_backend
from titiler.pgstac import dependencies as titiler_pgstac_dependencies

from tests.conftest import free_port, make_settings, serve_app
from tests.helpers import copy_items, lonlat_of_item_centre, mercator_tile
from tiler import catalogue as tiler_catalogue
from tiler.auth import mint_url_token
from tiler.concurrency import RenderLimiter
from tiler.ingest import load
from tiler.logs import log_handler
from tiler.main import create_app
from tiler.metrics import ORIGIN
from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler
from tiler.sample import COLLECTION_ID
from tiler.settings import AuthSettings, ObservabilitySettings
from tiler.upstream import clear_http_cache

ORIGIN.enable()  # at collection time: GDAL decides once, at its first remote read, whether to count

SIGNING = "k1:" + "s" * 40
METRICS_TOKEN = "metrics-secret-0123456789"
POLICY = """
groups:
  team-a:
    - collections: [spot67-demo, slow-origin]
"""
MS_RGB = {"assets": "ms|bidx=3,2,1", "rescale": "200,1800"}
TILE_ROUTE = "/collections/{collection_id}/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}"
_FRESH = itertools.count(random.randrange(1_000_000))
ITEM_TILE_ROUTE = "/collections/{collection_id}/items/{item_id}/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}"


def forget_pgstac_lookups() -> dict:
    """Empty the TTL caches in front of pgstac, so the next request queries the database.

    Returns mosaic parameters no other request used (titiler-pgstac caches a mosaic's
    item search by search, tile and search options).
    """
    titiler_pgstac_backend.ttl_cache.clear()
    titiler_pgstac_dependencies.ttl_cache.clear()
    tiler_catalogue.forget_all()
    return {**MS_RGB, "scan_limit": 10_000 + next(_FRESH)}


def _tile(sample, z: int = 14, index: int = 0) -> tuple[int, int]:
    return mercator_tile(*lonlat_of_item_centre(sample.item(index)), z)


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def secured(dsn, tmp_path_factory):
    """An app with access control, URL tokens and a metrics token (requests from TestClient are not local)."""
    d = tmp_path_factory.mktemp("obs-auth")
    (d / "policy.yaml").write_text(POLICY)
    auth = AuthSettings(policy_file=str(d / "policy.yaml"), signing_keys=SIGNING)
    settings = make_settings(dsn, auth=auth)
    settings.observability = ObservabilitySettings(metrics_token=METRICS_TOKEN)
    app = create_app(settings)
    token, _ = mint_url_token(auth.keys(), sub="alice", groups=["team-a"], ttl=600)
    with TestClient(app) as c:
        yield c, token


@pytest.fixture()
def access_lines():
    """JSON lines written by the handler `tiler.logs.configure_logging` installs.

    Every thread's lines: servers still running from earlier tests write here too, so a
    test keeps the lines of its own requests (by request id).
    """
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(old)


def scrape(client) -> tuple[str, dict]:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text, metric_samples(r.text)


# --------------------------------------------------------------------------- metrics


def test_metrics_count_by_route_template_not_path(secured, sample, cog_server):
    client, token = secured
    x, y = _tile(sample)
    clear_http_cache(cog_server.url)  # GDAL must go to the origin again
    params = forget_pgstac_lookups()
    _, before = scrape(client)
    for _ in range(3):
        r = client.get(
            f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/14/{x}/{y}.png", params=params
        )
        assert r.status_code == 200, r.text
    r = client.get(f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/99/0/0.png", params=MS_RGB)
    assert r.status_code != 200  # 204: no data there
    text, after = scrape(client)

    assert token not in text and x.__str__() + "/" not in text
    ok = {"method": "GET", "route": TILE_ROUTE, "status": "200"}
    assert (
        value(after, "tiler_http_requests_total", **ok) - value(before, "tiler_http_requests_total", **ok)
        == 3
    )
    n = "tiler_http_request_duration_seconds_count"
    assert value(after, n, **ok) - value(before, n, **ok) == 3
    bad = {"method": "GET", "route": TILE_ROUTE, "status": str(r.status_code)}
    assert (
        value(after, "tiler_http_requests_total", **bad) - value(before, "tiler_http_requests_total", **bad)
        == 1
    )
    # pgstac time: the mosaic searched pgstac (then its TTL caches answer)
    q = "tiler_pgstac_query_duration_seconds"
    assert value(after, q + "_count") - value(before, q + "_count") >= 1
    assert value(after, q + "_sum") > value(before, q + "_sum")
    # pool gauges, read at scrape time
    assert value(after, "tiler_db_pool_max") == 4
    assert value(after, "tiler_db_pool_size") >= 1
    assert value(after, "tiler_db_pool_requests_total") > value(before, "tiler_db_pool_requests_total")
    # origin traffic, from GDAL's network statistics
    host = cog_server.url.removeprefix("http://")
    assert value(after, "tiler_origin_requests_total", host=host, method="GET") > value(
        before, "tiler_origin_requests_total", host=host, method="GET"
    )
    assert value(after, "tiler_origin_bytes_total", host=host) > value(
        before, "tiler_origin_bytes_total", host=host
    )
    # families without traffic yet are exported at zero
    assert ("tiler_tile_cache_requests_total", frozenset({("result", "hit")})) in after
    assert ("tiler_renders_in_flight", frozenset()) in after
    assert ("tiler_render_rejections_total", frozenset({("reason", "full")})) in after


def test_metrics_access(secured, live_server):
    client, token = secured
    assert client.get("/metrics").status_code == 403  # TestClient's address is not loopback
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get(f"/t/{token}/metrics").status_code == 403  # a URL token is not a metrics token
    r = httpx.get(f"{live_server}/metrics", timeout=10)  # 127.0.0.1
    assert r.status_code == 200 and "tiler_http_requests_total" in r.text


# --------------------------------------------------------------------------- logs, request id, Server-Timing


def test_access_log_json(secured, sample, access_lines):
    client, token = secured
    x, y = _tile(sample)
    url = f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/14/{x}/{y}.png"
    params = forget_pgstac_lookups()
    r = client.get(url, params=params, headers={"X-Request-ID": "qgis-4711.a"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "qgis-4711.a"
    r2 = client.get(url, params=MS_RGB, headers={"X-Request-ID": "not valid; rm -rf"})
    generated = r2.headers["x-request-id"]
    assert generated != "not valid; rm -rf" and len(generated) == 32
    iid = sample.item(0)["id"]
    r3 = client.get(
        f"/t/{token}/collections/{COLLECTION_ID}/items/{iid}/tiles/WebMercatorQuad/14/{x}/{y}.png",
        params=MS_RGB,
        headers={"X-Request-ID": "qgis-4711.c"},
    )
    assert r3.status_code == 200

    # the capture is the root logger's: it also holds lines other servers of the session write
    # meanwhile (a live server's access line lands after its client got the answer); keep ours
    ours = ["qgis-4711.a", generated, "qgis-4711.c"]
    lines = [line for line in access_lines() if line["logger"] == "tiler.http" and line["request_id"] in ours]
    assert [line["request_id"] for line in lines] == ours
    first = lines[0]
    assert first["request_id"] == "qgis-4711.a"
    assert first["method"] == "GET" and first["route"] == TILE_ROUTE and first["status"] == 200
    assert first["duration_ms"] > 0 and first["db_ms"] > 0
    assert first["user"] == "alice"
    assert first["items"] == len(r.headers["x-assets"].split(",")) >= 1
    assert lines[1]["request_id"] == generated
    assert lines[2]["route"] == ITEM_TILE_ROUTE and lines[2]["items"] == 1
    raw = json.dumps(access_lines())
    assert token not in raw and token[:20] not in raw


def test_error_log_carries_request_id(client, cog_server, access_lines):
    url = f"{cog_server.url}/missing.tif"
    r = client.get("/cog/info", params={"url": url}, headers={"X-Request-ID": "err-1"})
    assert r.status_code >= 400 and r.headers["x-request-id"] == "err-1"
    mine = [line for line in access_lines() if line.get("request_id") == "err-1"]
    assert {line["logger"] for line in mine} >= {"tiler.http", "tiler.errors"}
    assert [line["status"] for line in mine if line["logger"] == "tiler.http"] == [r.status_code]


def test_server_timing(secured, sample):
    client, token = secured
    x, y = _tile(sample)
    params = forget_pgstac_lookups()
    r = client.get(
        f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/14/{x}/{y}.png", params=params
    )
    timing = {
        p.split(";")[0].strip(): float(p.split("dur=")[1]) for p in r.headers["server-timing"].split(",")
    }
    assert {"search", "mosaicking", "total", "db"} <= timing.keys()
    assert timing["total"] >= timing["mosaicking"] and timing["db"] > 0, r.headers["server-timing"]
    iid = sample.item(0)["id"]
    r = client.get(
        f"/t/{token}/collections/{COLLECTION_ID}/items/{iid}/tiles/WebMercatorQuad/14/{x}/{y}.png",
        params=MS_RGB,
    )
    timing = {
        p.split(";")[0].strip(): float(p.split("dur=")[1]) for p in r.headers["server-timing"].split(",")
    }
    assert {"total", "db"} <= timing.keys() and timing["total"] > 0


# --------------------------------------------------------------------------- concurrency limit


def test_render_limiter_queue_and_timeout():
    async def scenario():
        lim = RenderLimiter(max_renders=1, queue=1, timeout=0.3)
        await lim.acquire()
        waiter = asyncio.create_task(lim.acquire())
        await asyncio.sleep(0.05)
        with pytest.raises(Exception) as full:  # queue of 1 is taken: refused at once
            await lim.acquire()
        assert full.value.status_code == 503 and full.value.headers["Retry-After"] == "1"
        lim.release()  # the slot goes to the waiter, not to a newcomer
        await asyncio.wait_for(waiter, 1)
        assert lim.active == 1
        t0 = time.monotonic()
        with pytest.raises(Exception) as late:
            await lim.acquire()  # queued, then times out
        assert late.value.status_code == 503 and 0.25 < time.monotonic() - t0 < 1.0
        lim.release()
        assert lim.active == 0 and not lim._waiters

    asyncio.run(scenario())


class SlowHandler(RangeRequestHandler):
    """Storage that takes 0.5 s per request."""

    def _serve(self, body: bool) -> None:
        time.sleep(0.5)
        super()._serve(body)


@pytest.fixture(scope="module")
def slow_server(dsn, sample, tmp_path_factory):
    """Collection slow-origin (the sample items on a slow range server) behind uvicorn with 1 render, no queue."""
    origin = RangeHTTPServer(sample.directory, handler_class=SlowHandler)
    origin.start_background()

    def rehost(items):
        for it in items:
            for a in it["assets"].values():
                a["href"] = origin.url + "/" + a["href"].rsplit("/", 1)[1]

    load(dsn, copy_items(sample, tmp_path_factory.mktemp("slow"), "slow-origin", rehost), progress=False)
    settings = make_settings(dsn)
    settings.api.max_renders, settings.api.render_queue = 1, 0
    with serve_app(create_app(settings)) as (base, _):
        yield base, origin
    origin.shutdown()


def test_concurrency_limit_sheds_renders(slow_server, sample):
    base, origin = slow_server
    clear_http_cache(origin.url)
    iid = sample.item(0)["id"]
    lon, lat = lonlat_of_item_centre(sample.item(0))
    urls = []
    for z in (14, 15, 16) * 2:
        x, y = mercator_tile(lon, lat, z)
        urls.append(f"{base}/collections/slow-origin/items/{iid}/tiles/WebMercatorQuad/{z}/{x}/{y}.png")

    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(len(urls)) as pool:
        http.get(f"{base}/livez")  # connection pool warm, client set up

        def get(url, **params):
            t0 = time.monotonic()
            r = http.get(url, params=params)
            return r, time.monotonic() - t0

        futures = [pool.submit(get, u, **MS_RGB) for u in urls]
        time.sleep(0.2)  # a render is in flight: metadata still answers
        meta, _ = get(f"{base}/collections/slow-origin/items/{iid}/WebMercatorQuad/tilejson.json")
        health, health_s = get(f"{base}/livez")
        results = [f.result() for f in futures]
        text = http.get(f"{base}/metrics").text

    assert meta.status_code == 200 and health.status_code == 200 and health_s < 1.0, meta.text
    codes = [r.status_code for r, _ in results]
    ok = [s for r, s in results if r.status_code == 200]
    shed = [(r, s) for r, s in results if r.status_code == 503]
    assert len(ok) + len(shed) == len(urls) and ok and shed, codes
    for r, s in shed:
        assert r.headers["retry-after"].isdigit()
        assert "busy" in r.json()["detail"]
        assert s < 1.0 and s < max(ok)  # refused at once, not after the slow render
    samples = metric_samples(text)
    assert value(samples, "tiler_render_rejections_total", reason="full") >= len(shed)
    assert value(samples, "tiler_renders_in_flight") == 0


# --------------------------------------------------------------------------- several workers


def test_two_workers_share_metrics_and_log_json(cluster, dsn, tmp_path):
    """`tiler serve --workers 2` with PROMETHEUS_MULTIPROC_DIR: /metrics sums both processes."""
    from tests.test_service import _serve_env

    mp = tmp_path / "prom"
    mp.mkdir()
    port = free_port()
    env = _serve_env(cluster, port, TILER_AUTH_ENABLED="false", PROMETHEUS_MULTIPROC_DIR=str(mp))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiler.cli", "serve", "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        time.sleep(3)  # the second worker
        assert len(list(mp.glob("counter_*.db"))) == 2, "one file per worker"
        before = value(
            metric_samples(httpx.get(base + "/metrics", timeout=10).text),
            "tiler_http_requests_total",
            method="GET",
            route="/livez",
            status="200",
        )
        with httpx.Client(timeout=10) as http:
            for _ in range(20):
                http.get(base + "/livez", headers={"Connection": "close"})  # new connection: either worker
        after = value(
            metric_samples(httpx.get(base + "/metrics", timeout=10).text),
            "tiler_http_requests_total",
            method="GET",
            route="/livez",
            status="200",
        )
        assert after - before == 20
        # per-worker gauges read at scrape time: the answering worker's caches, with its pid
        caches = [
            f
            for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text)
            if f.name == "tiler_cache_limit_bytes"
        ]
        assert len(caches) == 1
        limits = {s.labels["cache"]: s.value for s in caches[0].samples}
        assert limits["tiles"] == 16 * 2**20 and limits["http_chunks"] == 32_000_000, limits
        assert limits["gdal_blocks"] == 32 * 2**20, limits  # the defaults, applied at start
        assert {s.labels["pid"] for s in caches[0].samples} != {str(proc.pid)}  # a worker's, not the master's
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(out.splitlines()), "every log line is JSON"
    access = [line for line in lines if line["logger"] == "tiler.http" and line["route"] == "/livez"]
    assert len(access) >= 20 + before
    assert not [line for line in lines if line["logger"] == "uvicorn.access"]


def test_unhandled_error_answers_json_500_with_request_id(access_lines):
    """A bug in an endpoint: JSON 500 with the request id, and the server's traceback line carries it."""
    from fastapi import FastAPI

    from tiler.metrics import ObservabilityMiddleware

    app = FastAPI()

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom token=s3cr3t")

    app.add_middleware(ObservabilityMiddleware)
    uv = logging.getLogger("uvicorn")  # a uvicorn started earlier with its own log config stops propagation
    propagate, uv.propagate = uv.propagate, True
    try:
        with serve_app(app, log_config=None, access_log=False) as (base, _):
            r = httpx.get(f"{base}/boom", headers={"X-Request-ID": "boom-1"}, timeout=10)
    finally:
        uv.propagate = propagate
    assert r.status_code == 500 and r.json() == {"detail": "Internal Server Error"}
    assert r.headers["x-request-id"] == "boom-1"
    mine = [line for line in access_lines() if line.get("request_id") == "boom-1"]
    assert [line["status"] for line in mine if line["logger"] == "tiler.http"] == [500]
    errors = [line for line in mine if "error" in line]
    assert errors and "kaboom" in errors[0]["error"] and "s3cr3t" not in errors[0]["error"]


def test_tile_cache_counter_follows_the_cache(secured, sample):
    client, token = secured
    x, y = _tile(sample, z=15, index=1)
    params = forget_pgstac_lookups()  # a tile nobody asked for yet
    url = f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/15/{x}/{y}.png"
    _, before = scrape(client)
    first = client.get(url, params=params)
    again = [client.get(url, params=params) for _ in range(2)]
    _, after = scrape(client)
    assert first.headers["x-tile-cache"] == "miss" and all(r.headers["x-tile-cache"] == "hit" for r in again)

    def delta(result: str) -> float:
        name = "tiler_tile_cache_requests_total"
        return value(after, name, result=result) - value(before, name, result=result)

    assert (delta("miss"), delta("hit"), delta("hit-shared")) == (1, 2, 0)


def test_cache_sizes_are_exported(secured, sample):
    """`tiler_cache_bytes` follows what the caches hold: a new tile adds its bytes to `tiles`."""
    import os

    from tiler.settings import GdalSettings, TileCacheSettings

    client, token = secured
    pid = str(os.getpid())
    x, y = _tile(sample, z=15, index=2)
    params = forget_pgstac_lookups()  # a tile nobody asked for yet
    url = f"/t/{token}/collections/{COLLECTION_ID}/tiles/WebMercatorQuad/15/{x}/{y}.png"
    _, before = scrape(client)
    r = client.get(url, params=params)
    assert r.status_code == 200 and r.headers["x-tile-cache"] == "miss", r.text
    _, after = scrape(client)

    def held(s: dict, cache: str) -> float:
        return value(s, "tiler_cache_bytes", cache=cache, pid=pid)

    def bound(s: dict, cache: str) -> float:
        return value(s, "tiler_cache_limit_bytes", cache=cache, pid=pid)

    # the bounds are the settings (the fixture's app has the defaults), in bytes
    assert bound(after, "tiles") == TileCacheSettings().max_mb * 2**20
    assert held(after, "tiles") - held(before, "tiles") >= len(r.content)  # the tile and its headers
    assert 0 < held(after, "tiles") <= bound(after, "tiles")
    # the sample's COGs are read through the tiler's reader (HTTP, `file:size`) and stay open
    assert bound(after, "http_chunks") == int(GdalSettings().cpl_vsil_curl_cache_size)
    assert 0 < held(after, "http_chunks") <= bound(after, "http_chunks")
    assert bound(after, "gdal_blocks") == GdalSettings().gdal_cachemax * 2**20
    assert 0 < held(after, "gdal_blocks") <= bound(after, "gdal_blocks")
