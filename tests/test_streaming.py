"""The seed's flow: pystac_client searches the STAC API, gets signed COG links, GDAL/rasterio/QGIS stream them.

Everything real: stac-fastapi-pgstac on the test pgstac, the tiler behind uvicorn on
127.0.0.1, the COGs on the test Range server, API keys and URL tokens from a real policy.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window, from_bounds

from tests.conftest import make_settings, serve_app
from tests.helpers import write_auth
from tests.test_auth import b_item  # noqa: F401 - collection B (restricted-b), a fixture
from tests.test_clients import SYSTEM_PYTHON, _has_qgis
from tiler.auth import _b64d, _b64e, mint_url_token
from tiler.main import create_app
from tiler.settings import AuthSettings, StreamSettings
from tiler.stream import RangeNotAccepted, check_range

A, B = "spot67-demo", "restricted-b"
SIGNING = "k1:" + "s" * 40
ALICE, CAROL, VIC = ("dtk_alice-" + "a" * 40, "dtk_carol-" + "c" * 40, "dtk_vic-" + "v" * 40)
POLICY = """
groups:
  team-a:
    - collections: [spot67-demo, "faulty-*"]
  team-b:
    - collections: [restricted-*]
  viewers:
    - collections: [spot67-demo]
      operations: [metadata, tiles]
  public-meta:
    - collections: [spot67-demo]
      operations: [metadata]
anonymous: [public-meta]
"""


@pytest.fixture(scope="module")
def auth(tmp_path_factory) -> AuthSettings:
    users = [("alice", ALICE, "team-a"), ("carol", CAROL, "team-b"), ("vic", VIC, "viewers")]
    return write_auth(tmp_path_factory.mktemp("stream-auth"), POLICY, users, SIGNING)


def _settings(dsn, auth, **stream):
    s = make_settings(dsn, auth=auth)
    if stream:
        s.stream = StreamSettings(**stream)
    return s


@pytest.fixture(scope="module")
def server(dsn, auth, b_item):  # noqa: F811
    with serve_app(create_app(_settings(dsn, auth))) as (base, _):
        yield base


def key(k: str) -> dict[str, str]:
    return {"X-API-Key": k}


def stac_search(server, headers=None, **body) -> dict:
    r = httpx.post(f"{server}/stac/search", json=body, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def asset_href(server, item_id: str, asset: str = "ms", headers=None) -> str:
    r = httpx.get(f"{server}/stac/collections/{A}/items/{item_id}", headers=headers or key(ALICE), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["assets"][asset]["href"]


# --------------------------------------------------------------------------- the STAC API and its rights


def test_pystac_client_gets_signed_hrefs_and_only_its_collections(server, sample, cog_server, b_item):  # noqa: F811
    from pystac_client import Client

    client = Client.open(f"{server}/stac", headers=key(ALICE))
    assert {c.id for c in client.get_collections()} - {"faulty-files"} == {A}
    items = list(client.search(collections=[A], max_items=10, limit=1).items())  # paged one by one
    assert sorted(i.id for i in items) == sorted(it["id"] for it in sample.items)
    for item in items:
        for name, asset in item.assets.items():
            assert asset.href.startswith(f"{server}/t/dt1."), asset.href
            assert asset.href.endswith(
                f"/stream/collections/{A}/items/{item.id}/assets/{name}/{item.id}_{name}.tif"
            )
        rels = {link.rel: link for link in item.links}
        assert {"xyz", "wmts", "tilejson"} <= rels.keys()
        assert rels["xyz"].href.startswith(f"{server}/t/dt1.") and "preset=" in rels["xyz"].href
    # the web-map links work as they are: TileJSON, a tile of it, and the WMTS layer they name
    links = {link.rel: link for link in items[0].links}
    tj = httpx.get(links["tilejson"].href, timeout=30).json()
    z = tj["maxzoom"] - 2
    lon, lat = (tj["bounds"][0] + tj["bounds"][2]) / 2, (tj["bounds"][1] + tj["bounds"][3]) / 2
    from tests.helpers import mercator_tile

    x, y = mercator_tile(lon, lat, z)
    tile = httpx.get(tj["tiles"][0].format(z=z, x=x, y=y), timeout=30)
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/png"
    caps = httpx.get(links["wmts"].href, timeout=30).text
    assert f"<ows:Identifier>{links['wmts'].extra_fields['wmts:layer']}</ows:Identifier>" in caps
    # the stored hrefs (the COG host) appear nowhere in the answers
    raw = httpx.post(f"{server}/stac/search", json={"collections": [A]}, headers=key(ALICE)).text
    assert cog_server.url not in raw and "/b/B_" not in raw
    # nothing widens the search: collection B by name, by id, by CQL2, by no filter at all
    assert stac_search(server, key(ALICE), collections=[B])["features"] == []
    assert stac_search(server, key(ALICE), ids=[b_item["id"]])["features"] == []
    cql = {"op": "=", "args": [{"property": "collection"}, B]}
    assert stac_search(server, key(ALICE), **{"filter": cql, "filter-lang": "cql2-json"})["features"] == []
    ids = {f["collection"] for f in stac_search(server, key(ALICE), limit=100)["features"]}
    assert ids - {"faulty-files"} == {A}
    r = httpx.get(f"{server}/stac/search", params={"collections": B, "ids": b_item["id"]}, headers=key(ALICE))
    assert r.status_code == 200 and r.json()["features"] == []
    # B is hidden from alice like a missing collection, and visible to carol, who does not see A
    for path in (
        f"/stac/collections/{B}",
        f"/stac/collections/{B}/items",
        f"/stac/collections/{B}/items/{b_item['id']}",
    ):
        assert httpx.get(server + path, headers=key(ALICE)).status_code == 404, path
    # carol (team-b) sees B, and A's metadata through the anonymous grant that every caller has
    carol = Client.open(f"{server}/stac", headers=key(CAROL))
    assert {c.id for c in carol.get_collections()} == {A, B}
    assert [i.id for i in carol.search(collections=[B], max_items=10).items()] == [b_item["id"]]
    assert b_item["id"] in {i.id for i in carol.search(max_items=50).items()}
    landing = httpx.get(f"{server}/stac/", headers=key(ALICE)).json()
    data = [link["href"] for link in landing["links"] if link["rel"] == "data"]
    assert data and all(h.startswith(f"{server}/stac/") for h in data)


def test_sortby_filter_and_get_search(server, sample):
    dates = sorted((it["properties"]["datetime"], it["id"]) for it in sample.items)
    asc = stac_search(server, key(ALICE), collections=[A], sortby=[{"field": "datetime", "direction": "asc"}])
    assert [f["id"] for f in asc["features"]] == [i for _, i in dates]
    first = dates[0][1]
    r = httpx.get(
        f"{server}/stac/search",
        params={"collections": A, "filter": f"id = '{first}'", "filter-lang": "cql2-text"},
        headers=key(ALICE),
    )
    assert r.status_code == 200 and [f["id"] for f in r.json()["features"]] == [first]


def test_anonymous_and_bad_credentials(server, sample):
    # anonymous: the policy's `anonymous` groups (metadata on A): items, but links with no token
    body = stac_search(server, None, collections=[A])
    assert len(body["features"]) == len(sample.items)
    href = body["features"][0]["assets"]["ms"]["href"]
    assert "/t/" not in href and href.startswith(f"{server}/stream/")
    assert "xyz" not in {link["rel"] for link in body["features"][0]["links"]}  # no tiles right
    assert httpx.get(href, headers={"Range": "bytes=0-15"}).status_code == 401
    assert (
        httpx.get(f"{server}/stac/collections", headers=key("dtk_unknown-key-" + "x" * 30)).status_code == 401
    )


# --------------------------------------------------------------------------- Range semantics


def test_range_head_suffix_416_and_conditional(server, sample):
    item = sample.item(0)
    href = asset_href(server, item["id"])
    data = sample.path(0, "ms").read_bytes()
    head = httpx.head(href)
    assert head.status_code == 200, head.text
    assert int(head.headers["content-length"]) == len(data)
    assert (
        head.headers["accept-ranges"] == "bytes"
        and head.headers.get("etag")
        and head.headers.get("last-modified")
    )
    assert "private" in head.headers["cache-control"]
    r = httpx.get(href, headers={"Range": "bytes=100-1099"})
    assert r.status_code == 206 and r.content == data[100:1100]
    assert (
        r.headers["content-range"] == f"bytes 100-1099/{len(data)}" and r.headers["content-length"] == "1000"
    )
    r = httpx.get(href, headers={"Range": "bytes=-500"})
    assert r.status_code == 206 and r.content == data[-500:]
    r = httpx.get(href, headers={"Range": f"bytes={len(data) - 10}-"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = httpx.get(href, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = httpx.get(href, headers={"Range": "bytes=0-10,20-30"})
    assert r.status_code == 416 and "one byte range" in r.json()["detail"]
    r = httpx.get(href)
    assert r.status_code == 200 and r.content == data and "content-encoding" not in r.headers
    r = httpx.get(href, headers={"If-None-Match": head.headers["etag"]})
    assert r.status_code == 304 and r.content == b""
    r = httpx.get(href, headers={"Range": "bytes=0-99", "Accept-Encoding": "gzip, br"})
    assert r.status_code == 206 and "content-encoding" not in r.headers and r.content == data[:100]


def test_check_range_unit():
    assert check_range("bytes=0-9") == "bytes=0-9" and check_range("bytes=-5") == "bytes=-5"
    assert check_range("bytes=7-") == "bytes=7-" and check_range(None) is None
    for bad in ("bytes=9-0", "bytes=-", "items=0-1", "bytes=0-1,3-4", "bytes=-0", "bytes=a-b"):
        with pytest.raises(RangeNotAccepted):
            check_range(bad)


# --------------------------------------------------------------------------- the real clients


def test_rasterio_reads_a_window_equal_to_the_source(server, sample):
    item = sample.item(1)
    href = asset_href(server, item["id"])
    with rasterio.open(sample.path(1, "ms")) as src:
        expected = src.read(window=Window(40, 50, 64, 32))
        profile = (src.crs, src.transform, src.count)
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(href) as ds:
        assert (ds.crs, ds.transform, ds.count) == profile
        got = ds.read(window=Window(40, 50, 64, 32))
    np.testing.assert_array_equal(got, expected)


def _streamed(server: str, collection: str = A) -> float:
    text = httpx.get(f"{server}/metrics").text  # open to loopback
    found = re.findall(rf'tiler_stream_bytes_total\{{collection="{collection}"\}} (\S+)', text)
    return sum(float(v) for v in found)


def test_gdalinfo_and_gdal_translate_cut_an_aoi(server, sample, tmp_path):
    item = sample.item(2)
    href = asset_href(server, item["id"], "pan")
    size = sample.path(2, "pan").stat().st_size
    # the stricter GDAL set-ups users copy from COG guides: .tif URLs only, directory listing on
    env = {**os.environ, "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif", "GDAL_DISABLE_READDIR_ON_OPEN": "NO"}
    before = _streamed(server)
    out = subprocess.run(
        ["gdalinfo", "-json", f"/vsicurl/{href}"], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    opened = _streamed(server) - before
    assert 0 < opened < size / 4, (opened, size)  # the header, not the file
    info = json.loads(out.stdout)
    assert info["files"] == [f"/vsicurl/{href}"]  # no sibling .ovr/.aux.xml/.msk "found"
    # GDAL's defaults (sibling files probed by name, any extension): still one file
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("CPL_VSIL", "GDAL_DISABLE"))}
    out2 = subprocess.run(
        ["gdalinfo", "-json", f"/vsicurl/{href}"], capture_output=True, text=True, env=plain
    )
    assert out2.returncode == 0 and "recursion" not in out2.stderr, out2.stderr[-500:]
    assert json.loads(out2.stdout)["files"] == [f"/vsicurl/{href}"]
    r = httpx.get(href + ".ovr", headers={"Range": "bytes=0-15"})
    assert r.status_code == 404 and "_pan.tif" in r.json()["detail"]
    with rasterio.open(sample.path(2, "pan")) as src:
        assert info["size"] == [src.width, src.height]
        b = src.bounds
        aoi = (b.left + 300, b.top - 300, b.left + 600, b.top - 450)  # ulx uly lrx lry, on the pixel grid
        win = from_bounds(aoi[0], aoi[3], aoi[2], aoi[1], src.transform).round_offsets().round_lengths()
        expected = src.read(1, window=win)
    dst = tmp_path / "aoi.tif"
    out = subprocess.run(
        ["gdal_translate", "-q", "-projwin", *map(str, aoi), f"/vsicurl/{href}", str(dst)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    with rasterio.open(dst) as ds:
        np.testing.assert_array_equal(ds.read(1), expected)


QGIS_SCRIPT = r"""
import json, sys
from qgis.core import QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QSize

args = json.loads(sys.argv[1])
app = QgsApplication([], False)
app.initQgis()
layer = QgsRasterLayer("/vsicurl/" + args["href"], "cog", "gdal")
out = {"valid": layer.isValid()}
if layer.isValid():
    out["bands"] = layer.bandCount()
    out["width"], out["height"] = layer.width(), layer.height()
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(layer.extent())
    settings.setOutputSize(QSize(256, 256))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    job.renderedImage().save(args["out"])
    out["errors"] = [e.message for e in job.errors()]
else:
    out["error"] = layer.error().summary()
print(json.dumps(out), flush=True)
import os
os._exit(0)  # QGIS 3.22 can crash in its exit handlers once GDAL's /vsicurl/ threads ran
"""


@pytest.mark.skipif(
    not _has_qgis() and os.environ.get("CI") != "true",
    reason="QGIS (Debian python3-qgis) is not installed; `make test` installs it",
)
def test_qgis_loads_the_signed_href_and_renders_it(server, sample, tmp_path):
    from PIL import Image

    href = asset_href(server, sample.item(0)["id"])
    profile = Path(tempfile.mkdtemp(prefix="qgis-profile-"))
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(profile),
        "XDG_RUNTIME_DIR": str(profile),
    }
    env.pop("PYTHONPATH", None)
    png = tmp_path / "qgis.png"
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", QGIS_SCRIPT, json.dumps({"href": href, "out": str(png)})],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    with rasterio.open(sample.path(0, "ms")) as src:
        assert out["valid"] and (out["bands"], out["width"], out["height"]) == (
            src.count,
            src.width,
            src.height,
        ), out
    assert out["errors"] == []
    img = np.asarray(Image.open(png).convert("RGBA"))
    assert (img[..., 3] > 0).mean() > 0.5 and img[..., :3].std() > 10  # a picture, not an empty canvas


# --------------------------------------------------------------------------- tokens


def _token_of(href: str) -> str:
    return re.search(r"/t/([^/]+)/", href).group(1)


def test_item_token_opens_its_item_only(server, sample):
    a, b = sample.item(0)["id"], sample.item(1)["id"]
    href = asset_href(server, a)
    assert httpx.get(href, headers={"Range": "bytes=0-15"}).status_code == 206
    other = href.replace(f"/items/{a}/", f"/items/{b}/")
    r = httpx.get(other, headers={"Range": "bytes=0-15"})
    assert r.status_code == 403 and "one item" in r.json()["detail"]
    # the same token cannot list or tile the collection, nor search the STAC API
    tok = _token_of(href)
    assert httpx.get(f"{server}/t/{tok}/collections/{A}/WebMercatorQuad/tilejson.json").status_code == 403
    assert httpx.get(f"{server}/t/{tok}/stac/search").status_code == 403
    # but it tiles its own item (the web-map links)
    assert (
        httpx.get(f"{server}/t/{tok}/collections/{A}/items/{a}/WebMercatorQuad/tilejson.json").status_code
        == 200
    )


def test_tampered_expired_and_revoked_tokens_get_401_and_no_byte(server, sample):
    item = sample.item(0)["id"]
    href = asset_href(server, item)
    tok = _token_of(href)
    prefix, body, sig = tok.split(".")
    payload = json.loads(_b64d(body))
    payload["it"] = sample.item(1)["id"]
    forged = href.replace(tok, f"{prefix}.{_b64e(json.dumps(payload).encode())}.{sig}")
    keys = {"k1": ("s" * 40).encode()}
    expired, _ = mint_url_token(
        keys, sub="alice", groups=["team-a"], ttl=1, collections=[A], item=item, now=time.time() - 10
    )
    for bad in (forged, href.replace(tok, expired), href.replace(tok, tok[:-2] + "xx")):
        r = httpx.get(bad, headers={"Range": "bytes=0-1023"})
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/json"), bad
        assert b"II*" not in r.content and len(r.content) < 300
    # revoking the asset token (alice's own) closes the link
    assert httpx.post(f"{server}/auth/revoke", json={"token": tok}, headers=key(ALICE)).status_code == 204
    assert httpx.get(href, headers={"Range": "bytes=0-15"}).status_code == 401
    # links minted under a URL token die with it
    minted = httpx.post(f"{server}/auth/token", json={"collections": [A]}, headers=key(ALICE)).json()
    via = httpx.get(f"{minted['url_prefix']}/stac/collections/{A}/items/{item}").json()["assets"]["ms"][
        "href"
    ]
    assert httpx.get(via, headers={"Range": "bytes=0-15"}).status_code == 206
    assert (
        httpx.post(f"{server}/auth/revoke", json={"token": minted["token"]}, headers=key(ALICE)).status_code
        == 204
    )
    assert httpx.get(via, headers={"Range": "bytes=0-15"}).status_code == 401


def test_rights_are_checked_on_every_stream(server, sample, b_item):  # noqa: F811
    path = f"/stream/collections/{A}/items/{sample.item(0)['id']}/assets/ms/{sample.item(0)['id']}_ms.tif"
    assert httpx.get(server + path, headers={**key(ALICE), "Range": "bytes=0-15"}).status_code == 206
    assert httpx.get(server + path, headers={**key(CAROL), "Range": "bytes=0-15"}).status_code == 403
    # vic may see and tile A but not read its raw data: the STAC API still hides the stored href
    r = httpx.get(f"{server}/stac/collections/{A}/items/{sample.item(0)['id']}", headers=key(VIC))
    assert r.status_code == 200 and "/stream/" in r.json()["assets"]["ms"]["href"]
    assert httpx.get(r.json()["assets"]["ms"]["href"], headers={"Range": "bytes=0-15"}).status_code == 403
    bpath = f"/stream/collections/{B}/items/{b_item['id']}/assets/ms/{b_item['id']}_ms.tif"
    assert httpx.get(server + bpath, headers={**key(ALICE), "Range": "bytes=0-15"}).status_code == 403
    assert httpx.get(server + bpath, headers={**key(CAROL), "Range": "bytes=0-15"}).status_code == 206
    assert httpx.get(server + path.replace("/ms/", "/nope/"), headers=key(ALICE)).status_code == 404


def test_max_zoom_token_grants_no_data_and_small_previews(server, sample):
    item = sample.item(0)
    minted = httpx.post(
        f"{server}/auth/token", json={"collections": [A], "max_zoom": 12}, headers=key(ALICE)
    ).json()
    base = f"{minted['url_prefix']}/collections/{A}/items/{item['id']}"
    lon = sum(item["bbox"][::2]) / 2
    lat = sum(item["bbox"][1::2]) / 2
    b = item["bbox"]
    refused = [
        f"{minted['url_prefix']}/stream/collections/{A}/items/{item['id']}/assets/ms/{item['id']}_ms.tif",
        f"{base}/point/{lon},{lat}?assets=ms",
        f"{base}/bbox/{b[0]},{b[1]},{b[2]},{b[3]}.tif?assets=ms",
        f"{base}/statistics?assets=ms",
        f"{base}/preview.png?assets=ms&max_size=2048",
    ]
    for url in refused:
        assert httpx.get(url, timeout=30).status_code == 403, url
    r = httpx.get(
        f"{base}/preview.png",
        params={"assets": "ms|bidx=3,2,1", "max_size": 256, "rescale": "0,2000"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- limits, metrics, faults


@pytest.fixture(scope="module")
def big_item(dsn, sample, cog_server, tmp_path_factory):
    """Collection faulty-big: one item whose `pan` asset is a 24 MiB file (more than socket buffers hold)."""
    from tests.helpers import copy_items
    from tiler.ingest import load

    (Path(cog_server.directory) / "big.bin").write_bytes(os.urandom(24 << 20))

    def big(items):
        for it in items:
            it["assets"]["pan"]["href"] = cog_server.url + "/big.bin"
            it["assets"]["pan"].pop("file:size", None)

    paths = copy_items(sample, tmp_path_factory.mktemp("big"), "faulty-big", big)
    load(dsn, paths, progress=False, stats=False)
    return sample.item(0)["id"]


def test_streams_per_user_are_capped_and_counted(dsn, auth, sample, b_item, big_item):  # noqa: F811
    app = create_app(_settings(dsn, auth, max_per_user=1))
    with serve_app(app) as (base, _):
        href = f"{base}/stream/collections/faulty-big/items/{big_item}/assets/pan/{big_item}_pan.bin"
        before = app.state.stream_limiter.open_streams()
        with httpx.Client(timeout=30) as c, c.stream("GET", href, headers=key(ALICE)) as held:
            assert held.status_code == 200
            body = held.iter_raw(1024)  # kept: a dropped iterator closes the response
            next(body)  # the stream is open and not drained
            r = c.get(href, headers={**key(ALICE), "Range": "bytes=0-15"})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert (
                c.get(href, headers={**key(CAROL), "Range": "bytes=0-15"}).status_code == 403
            )  # rights first
        for _ in range(50):  # the slot comes back when the client hangs up
            if app.state.stream_limiter.open_streams() == before:
                break
            time.sleep(0.1)
        assert app.state.stream_limiter.open_streams() == before
        assert httpx.get(href, headers={**key(ALICE), "Range": "bytes=0-15"}).status_code == 206
        metrics = httpx.get(f"{base}/metrics").text
        sent = sum(
            float(v)
            for v in re.findall(r'tiler_stream_bytes_total\{collection="faulty-big"\} (\S+)', metrics)
        )
        assert sent >= 16
        assert 'tiler_stream_refused_total{reason="user"}' in metrics


def test_storage_faults_are_clean_and_name_no_url(server, sample, cog_server, dsn, tmp_path):
    from tests.helpers import copy_items
    from tiler.ingest import load

    def break_hrefs(items):
        for it in items:
            it["assets"]["ms"]["href"] = cog_server.url + "/missing/" + it["id"] + ".tif"
            it["assets"]["pan"]["href"] = "http://127.0.0.1:9/refused/" + it["id"] + ".tif"  # nothing listens

    load(dsn, copy_items(sample, tmp_path, "faulty-files", break_hrefs), progress=False, stats=False)
    item = sample.item(0)["id"]
    r = httpx.get(
        f"{server}/stream/collections/faulty-files/items/{item}/assets/ms/{item}_ms.tif", headers=key(ALICE)
    )
    assert r.status_code == 404 and f"{item}/ms" in r.json()["detail"], r.text
    r = httpx.get(
        f"{server}/stream/collections/faulty-files/items/{item}/assets/pan/{item}_pan.tif", headers=key(ALICE)
    )
    assert r.status_code == 502 and f"{item}/pan" in r.json()["detail"], r.text
    for text in (r.text, str(r.headers)):
        assert "127.0.0.1:9" not in text and cog_server.url not in text
    assert "no-store" in r.headers["cache-control"]
    # and the server still streams the good files
    assert httpx.get(asset_href(server, item), headers={"Range": "bytes=0-15"}).status_code == 206


def test_stream_outlives_the_request_deadline(dsn, auth, sample, b_item):  # noqa: F811
    s = _settings(dsn, auth)
    s.api.request_timeout = 2.0
    s.gdal.gdal_http_timeout = 1
    s.gdal.gdal_http_max_retry = 0
    app = create_app(s)
    with serve_app(app) as (base, _):
        href = f"{base}/stream/collections/{A}/items/{sample.item(0)['id']}/assets/pan/{sample.item(0)['id']}_pan.tif"
        data = sample.path(0, "pan").read_bytes()
        # a first request warms the fresh app (connections, item lookup): on a loaded machine
        # that alone could take the deadline, which is not what this test is about
        httpx.get(href, headers={**key(ALICE), "Range": "bytes=0-15"}, timeout=30)
        got = bytearray()
        with httpx.stream("GET", href, headers=key(ALICE), timeout=30) as r:
            assert r.status_code == 200
            for chunk in r.iter_raw(64 * 1024):
                got += chunk
                time.sleep(0.25)  # a slow reader: the whole body (~13 chunks) takes over the 2 s deadline
        assert bytes(got) == data


def test_threads_do_not_mix_bodies(server, sample):
    href = asset_href(server, sample.item(0)["id"], "pan")
    data = sample.path(0, "pan").read_bytes()
    errors = []

    def reader(i):
        start = (i * 37_919) % (len(data) - 5000)
        r = httpx.get(href, headers={"Range": f"bytes={start}-{start + 4999}"}, timeout=30)
        if r.status_code != 206 or r.content != data[start : start + 5000]:
            errors.append((i, r.status_code))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_max_zoom_scope_drops_data_and_caps_previews():
    from tiler.auth import Access

    full = Access({"tiles": None, "preview": None, "metadata": None, "data": None})
    assert dict(full.restrict(12).ops) == {"tiles": 12, "preview": 1024, "metadata": None}
    assert dict(Access({"preview": 256, "tiles": 10}).restrict(14).ops) == {"preview": 256, "tiles": 10}
    assert full.restrict(None) is full


def test_stac_search_caps_and_bad_filters_are_4xx(server):
    deep: dict = {"op": "=", "args": [{"property": "eo:cloud_cover"}, 1]}
    for _ in range(12):  # about 27 levels: over the filter cap (20), under the body cap (32)
        deep = {"op": "not", "args": [deep]}
    r = httpx.post(
        f"{server}/stac/search", json={"filter": deep, "filter-lang": "cql2-json"}, headers=key(ALICE)
    )
    assert r.status_code == 400 and "nesting depth" in r.json()["detail"], r.text
    r = httpx.get(
        f"{server}/stac/search", params={"ids": ",".join(f"i{n}" for n in range(5000))}, headers=key(ALICE)
    )
    assert r.status_code == 400, r.text
    for params in ({"filter": "eo:cloud_cover <<< 3"}, {"filter": "nosuchfunc(x) = 1"}, {"limit": "-1"}):
        r = httpx.get(f"{server}/stac/search", params=params, headers=key(ALICE))
        assert 400 <= r.status_code < 500, (params, r.status_code, r.text)
        assert "pgstac" not in r.text.lower() and "plpgsql" not in r.text.lower()
    r = httpx.get(f"{server}/stac/search", params={"limit": "5000", "collections": A}, headers=key(ALICE))
    assert r.status_code == 200  # a large page is lowered to TILER_STAC_MAX_ITEMS, not refused


def test_stac_api_database_outage_is_503_then_recovers(own_cluster):
    """The STAC API's own (asyncpg) pool: a clean 503 while PostgreSQL is down, then it recovers."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(make_settings(own_cluster.dsn))) as c:
        assert c.get("/stac/search", params={"collections": A}).status_code == 200
        own_cluster.stop(mode="immediate")
        t0 = time.monotonic()
        for _ in range(3):  # pooled connections die first, then new ones are refused
            r = c.get("/stac/search", params={"collections": A})
            assert r.status_code == 503 and r.headers.get("retry-after"), r.text
            assert own_cluster.password not in r.text and "127.0.0.1" not in r.text
        assert time.monotonic() - t0 < 15
        own_cluster.start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            r = c.get("/stac/search", params={"collections": A})
            if r.status_code == 200:
                break
            assert r.status_code == 503, r.text
            time.sleep(0.2)
        assert r.status_code == 200 and len(r.json()["features"]) == 3


def test_stac_routes_are_labelled_under_their_mount(dsn, caplog):
    """Metrics and access log name /stac routes with their mount, token-free, not as the tiler's own."""
    import logging

    from fastapi.testclient import TestClient

    caplog.set_level(logging.INFO, logger="tiler.http")
    with TestClient(create_app(make_settings(dsn))) as c:
        assert c.get("/stac/collections/spot67-demo").status_code == 200
        r = c.get(f"/stream/collections/{A}/items/nope/assets/ms/x.tif")
        assert r.status_code == 404, r.text
    lines = [r.getMessage() for r in caplog.records if r.name == "tiler.http"]
    assert any(m.startswith("GET /stac/collections/{collection_id} 200") for m in lines), lines
    stream = "/stream/collections/{collection_id}/items/{item_id}/assets/{asset_id}/{filename}"
    assert any(m.startswith(f"GET {stream} 404") for m in lines), lines


def test_storage_faults_mid_stream_and_before_it(dsn, sample, tmp_path):
    """A cut transfer ends the client's body early (never a silent short file) and frees the slot;
    5xx, 429 and a silent host map to 502, 503 and 504; the server streams normally afterwards."""
    from tests.faultserver import FaultServer
    from tests.helpers import copy_items
    from tiler.ingest import load

    fault = FaultServer(sample.directory)
    fault.start_background()
    name = sample.path(0, "ms").name
    modes = ("cut", "500", "429", "hang", "ok")

    def rehost(items):
        for it in items:
            it["assets"] = {m: dict(it["assets"]["ms"], href=f"{fault.url}/{m}/{name}") for m in modes}

    load(dsn, copy_items(sample, tmp_path, "faults-stream", rehost), progress=False, stats=False)
    s = make_settings(dsn)
    s.stream = StreamSettings(read_timeout=1.0, connect_timeout=1.0)
    app = create_app(s)
    item = sample.item(0)["id"]
    data = sample.path(0, "ms").read_bytes()

    def url(base, mode):
        return f"{base}/stream/collections/faults-stream/items/{item}/assets/{mode}/{item}_{mode}.tif"

    try:
        with serve_app(app) as (base, _):
            with pytest.raises(httpx.HTTPError):  # Content-Length promised, half the bytes sent
                httpx.get(url(base, "cut"), headers={"Range": "bytes=1000-60999"}, timeout=10)
            r = httpx.get(url(base, "500"), headers={"Range": "bytes=0-99"}, timeout=10)
            assert r.status_code == 502 and "HTTP 500" in r.json()["detail"]
            assert len(fault.requests("500")) == 2  # one retry
            r = httpx.get(url(base, "429"), headers={"Range": "bytes=0-99"}, timeout=10)
            assert r.status_code == 503 and r.headers["retry-after"]
            t0 = time.monotonic()
            r = httpx.get(url(base, "hang"), headers={"Range": "bytes=0-99"}, timeout=20)
            assert r.status_code == 504 and time.monotonic() - t0 < 6, r.text
            for text in (r.text, str(r.headers)):
                assert fault.url not in text
            r = httpx.get(url(base, "ok"), headers={"Range": "bytes=100-199"}, timeout=10)
            assert r.status_code == 206 and r.content == data[100:200]
            for _ in range(50):
                if app.state.stream_limiter.open_streams() == 0:
                    break
                time.sleep(0.1)
            assert app.state.stream_limiter.open_streams() == 0
    finally:
        fault.shutdown()
