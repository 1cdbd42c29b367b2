"""The service as a user meets it: `tiler serve` with PG* variables, health, landing, viewer, headers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from tests.conftest import free_port


def test_range_server_honours_range(cog_server, sample):
    url = sample.item(0)["assets"]["ms"]["href"]
    data = sample.path(0, "ms").read_bytes()
    r = httpx.get(url, headers={"Range": "bytes=100-1123"})
    assert r.status_code == 206
    assert r.content == data[100:1124]
    assert r.headers["content-range"] == f"bytes 100-1123/{len(data)}"
    r = httpx.get(url, headers={"Range": "bytes=-10"})
    assert r.content == data[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data) + 5}-"}).status_code == 416
    assert httpx.get(cog_server.url + "/missing.tif").status_code == 404


def test_sample_scenes_are_spot_like(sample):
    import rasterio

    ms, pan = sample.path(0, "ms"), sample.path(0, "pan")
    with rasterio.open(ms) as m, rasterio.open(pan) as p:
        assert (m.count, m.dtypes[0], m.res, m.nodata) == (4, "uint16", (6.0, 6.0), 0)
        assert (p.count, p.res) == (1, (1.5, 1.5))
        assert m.block_shapes[0] == (512, 512)
        assert p.block_shapes[0] == (512, 512)
        assert p.overviews(1), "pan has overviews"
        a = m.read(masked=True)
        # structure: neither flat nor noise (neighbouring pixels correlate)
        red = a[2].filled(0).astype(float)
        assert red.std() > 100
        corr = __import__("numpy").corrcoef(red[:, :-1].ravel(), red[:, 1:].ravel())[0, 1]
        assert corr > 0.5
    item = sample.item(0)
    assert [b["common_name"] for b in item["assets"]["ms"]["eo:bands"]] == ["blue", "green", "red", "nir"]
    assert item["assets"]["ms"]["file:header_size"] > 0
    assert sample.collection["renders"]["pansharpened"]["pansharpen"]["weights"]["*"]["green"] == 0.35


def test_health_landing_viewer_and_headers(client, sample):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["database_online"] is True and body["pgstac"].startswith("0.9")
    assert body["versions"]["titiler.pgstac"].startswith("3.2")
    assert r.headers["cache-control"] == "no-store"
    assert client.get("/livez").json() == {"status": "alive"}

    land = client.get("/", params={"f": "json"}).json()
    assert any(link["rel"] == "service-desc" for link in land["links"])
    assert "html" in client.get("/", headers={"accept": "text/html"}).headers["content-type"]

    item = sample.item(0)["id"]
    r = client.get(f"/collections/spot67-demo/items/{item}/WebMercatorQuad/map.html", params={"assets": "ms"})
    assert r.status_code == 200
    assert "unpkg.com" not in r.text and "/static/vendor/leaflet.js" in r.text
    assert client.get("/static/vendor/leaflet.js").status_code == 200

    ok = client.get(
        f"/collections/spot67-demo/items/{item}/preview.png",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800", "max_size": 64},
    )
    assert ok.headers["cache-control"].startswith("public")
    bad = client.get(f"/collections/spot67-demo/items/{item}/preview.png", params={"assets": "nope"})
    assert bad.status_code >= 400 and "public" not in bad.headers.get("cache-control", "")

    tms = client.get("/tileMatrixSets").json()
    ids = {t["id"] for t in tms["tileMatrixSets"]}
    assert {"WebMercatorQuad", "WGS1984Quad"} <= ids and "CDB1GlobalGrid" not in ids


def _serve_env(cluster, port: int, **extra: str) -> dict[str, str]:
    parts = urllib.parse.urlsplit(cluster.dsn)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "TILER_")) and k != "DATABASE_URL"}
    return keep | {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(parts.port),
        "PGUSER": parts.username,
        "PGPASSWORD": urllib.parse.unquote(parts.password),
        "PGDATABASE": "pgstac",
        "PORT": str(port),
        **extra,
    }


@pytest.fixture()
def served(cluster, dsn, tmp_path):
    """`tiler serve` in a subprocess, configured by PG* variables and a policy opening the demo collection."""
    port = free_port()
    parts = urllib.parse.urlsplit(cluster.dsn)
    policy = tmp_path / "policy.yaml"
    policy.write_text("groups:\n  public:\n    - collections: [spot67-demo]\nanonymous: [public]\n")
    env = _serve_env(cluster, port, TILER_AUTH_POLICY_FILE=str(policy))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiler.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base + "/livez", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    yield base, proc, parts.password
    proc.terminate()
    proc.wait(10)


def test_tiler_serve_with_pg_variables(served, sample):
    base, proc, password = served
    r = httpx.get(base + "/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["database_online"] is True
    item = sample.item(0)["id"]
    r = httpx.get(
        f"{base}/collections/spot67-demo/items/{item}/preview.png",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800", "max_size": 64},
        timeout=20,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # anonymous access granted by the policy: cacheable by shared caches
    assert r.headers["cache-control"].startswith("public")
    r = httpx.get(f"{base}/collections/other-collection/info", timeout=10)
    assert r.status_code == 401 and r.headers["cache-control"] == "no-store"
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    assert "connected to postgresql://postgres@127.0.0.1" in out
    assert password not in out  # the password never reaches the log


def test_tiler_serve_refuses_to_start_without_policy(cluster):
    """Access control is on by default: no policy file, no server (and a clear reason)."""
    env = _serve_env(cluster, free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "tiler.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "TILER_AUTH_POLICY_FILE is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gdal_cachemax_is_megabytes():
    """`TILER_GDAL_GDAL_CACHEMAX=200` means 200 MB for GDAL, not 200 bytes."""
    import rasterio
    from rasterio._env import get_gdal_config

    from tiler.settings import GdalSettings

    opts = GdalSettings(gdal_cachemax=200).options()
    with rasterio.Env(GDAL_CACHEMAX=opts["GDAL_CACHEMAX"]):
        assert int(get_gdal_config("GDAL_CACHEMAX")) == 200 * 1024 * 1024


def test_gdal_block_cache_bound_is_set_once_per_process_and_stays(dsn, sample):
    """GDAL's block cache bound is process-wide: set at start, never flipped back by a request's Env.

    rasterio.Env puts the previous bound (GDAL's default, 5 % of RAM) back on exit, so
    when each request set it, concurrent requests read with GDAL's default bound.
    """
    import rasterio
    from fastapi.testclient import TestClient

    from tests.conftest import make_settings
    from tests.helpers import lonlat_of_item_centre, mercator_tile
    from tiler import native
    from tiler.dependencies import gdal_env_dependency
    from tiler.main import create_app
    from tiler.sample import COLLECTION_ID
    from tiler.settings import GdalSettings

    assert "GDAL_CACHEMAX" not in GdalSettings().env_options()
    # what every read's rasterio.Env gets: without it, each request's Env would set the bound
    # and put GDAL's default back on exit, under the feet of the requests still reading
    assert "GDAL_CACHEMAX" not in gdal_env_dependency(GdalSettings())()
    assert "GDAL_HTTP_TIMEOUT" in gdal_env_dependency(GdalSettings())()
    assert GdalSettings().env_options().items() <= GdalSettings().options().items()
    with rasterio.Env():
        default = native.gdal_block_cache()[1]
    settings = make_settings(dsn)
    settings.gdal = GdalSettings(gdal_cachemax=40)
    bound = 40 * 2**20
    assert default != bound
    app = create_app(settings)
    try:
        assert native.gdal_block_cache()[1] == bound  # before any request
        item = sample.item(0)
        x, y = mercator_tile(*lonlat_of_item_centre(item), 16)
        url = f"/collections/{COLLECTION_ID}/items/{item['id']}/tiles/WebMercatorQuad/16/{x}/{y}.png"
        with TestClient(app) as client:
            for dx in (-1, 0, 1):
                r = client.get(
                    url.replace(f"/{x}/", f"/{x + dx}/"),
                    params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"},
                )
                assert r.status_code == 200, r.text
                assert native.gdal_block_cache()[1] == bound  # after each request too
            used, _ = native.gdal_block_cache()  # the datasets stay open, their blocks cached
            assert 0 < used <= bound
    finally:
        # back to the default bound, the one the other tests' apps set
        native.set_gdal_cache_max(GdalSettings().options()["GDAL_CACHEMAX"])
