"""Two dates compared (``/compare``): pixels against numpy on the two source COGs, rights, errors, viewer.

The second date is scene 0 of the sample with its MS bands changed: NIR x 0.6 on the northern
half (NDVI falls: vegetation lost), red x 0.6 on the southern half (NDVI rises). Expected
differences are computed here from the two COG files, by rio-tiler's `Reader.tile` on each
file directly and by nearest-neighbour sampling with pyproj (`helpers.expected_nearest`),
never from the server's own answers.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from conftest import make_settings
from fastapi.testclient import TestClient
from helpers import (
    expected_nearest,
    item_centre_tile,
    lonlat_of_item_centre,
    mercator_tile_centres,
    read_png,
    read_tif,
    write_auth,
)
from rio_tiler.colormap import cmap as rio_cmap
from rio_tiler.io import Reader
from test_browser import CHROMIUM, needs_chromium

from tiler.ingest import load
from tiler.main import create_app
from tiler.sample import MS_BANDS, header_size, write_cog

CH = "spot67-change"  # the two dates
LOCKED = "spot67-change-locked"  # the same two dates, in a collection team-a may not see
Z = 15
NDVI_BANDS = "(b4 - b3) / (b4 + b3)"  # nir, red of the sample MS files (blue, green, red, nir)
ANN_KEY = "dtk_ann-compare-key-0123456789abcdefghijklmno"
ROOT_KEY = "dtk_root-compare-key-0123456789abcdefghijklmn"
SIGNING = "k1:" + "c" * 40
POLICY = """
groups:
  team-a:
    - collections: [spot67-change]
  admins:
    - collections: ["*"]
"""


def _after_ms(before_path, after_path) -> None:
    """The second date: NIR x 0.6 in the northern half, red x 0.6 in the southern half."""
    with rasterio.open(before_path) as src:
        data, transform = src.read().astype("float64"), src.transform
    half = data.shape[1] // 2
    data[3, :half] *= 0.6
    data[2, half:] *= 0.6
    write_cog(after_path, np.rint(data).astype("uint16"), transform, [b[0] for b in MS_BANDS])


@pytest.fixture(scope="module")
def change(dsn, sample, tmp_path_factory):
    """Collections CH and LOCKED: scene 0 of the sample (before) and its changed copy a year later (after)."""
    before = copy.deepcopy(sample.item(0))
    after = copy.deepcopy(before)
    after["id"] = before["id"] + "_Y2"
    when = dt.datetime.fromisoformat(before["properties"]["datetime"].replace("Z", "+00:00"))
    after["properties"]["datetime"] = (when + dt.timedelta(days=365)).isoformat().replace("+00:00", "Z")
    path = sample.directory / f"{after['id']}_MS.tif"
    _after_ms(sample.path(0, "ms"), path)
    ms = after["assets"]["ms"]
    ms["href"] = ms["href"].rsplit("/", 1)[0] + "/" + path.name
    ms["file:size"], ms["file:header_size"] = path.stat().st_size, header_size(path)
    # a scene elsewhere (its footprint moved one degree east; never read)
    far = copy.deepcopy(before)
    far["id"] = before["id"] + "_FAR"
    far["bbox"] = [v + 1 if i % 2 == 0 else v for i, v in enumerate(far["bbox"])]
    far["geometry"]["coordinates"] = [[[lon + 1, lat] for lon, lat in far["geometry"]["coordinates"][0]]]
    for a in far["assets"].values():  # and its grid, 80 km east
        a["proj:transform"][2] += 80_000
        a["proj:bbox"] = [v + 80_000 if i % 2 == 0 else v for i, v in enumerate(a["proj:bbox"])]
    d = tmp_path_factory.mktemp("change")
    paths = []
    for cid, items in ((CH, (before, after, far)), (LOCKED, (before, after))):
        coll = dict(sample.collection, id=cid, title=f"Two dates ({cid})")
        (d / f"{cid}.json").write_text(json.dumps(coll))
        (d / f"{cid}.ndjson").write_text("".join(json.dumps(dict(i, collection=cid)) + "\n" for i in items))
        paths += [d / f"{cid}.json", d / f"{cid}.ndjson"]
    load(dsn, paths, progress=False)
    return {
        "before": before["id"],
        "after": after["id"],
        "far": far["id"],
        "before_path": sample.path(0, "ms"),
        "after_path": path,
    }


def pair_url(change, collection: str = CH) -> str:
    return f"/compare/collections/{collection}/items/{change['before']}/{change['after']}"


def centre(sample) -> tuple[int, int]:
    return item_centre_tile(sample.item(0), Z)


def rio_tiler_ndvi(path, x: int, y: int, z: int) -> np.ma.MaskedArray:
    """NDVI of one COG over tile x/y/z, read by rio-tiler's file reader (not the server's STAC readers)."""
    with Reader(str(path)) as src:
        return src.tile(x, y, z, expression=NDVI_BANDS).array.astype("float32")


def nearest_ndvi(path, x: int, y: int, z: int) -> tuple[np.ndarray, np.ndarray]:
    """NDVI by nearest-neighbour sampling of the COG at the tile's pixel centres (pyproj + rasterio)."""
    values, valid = expected_nearest(path, *mercator_tile_centres(x, y, z))
    nir, red = values[3].astype("float64"), values[2].astype("float64")
    return (nir - red) / np.where(nir + red == 0, 1, nir + red), valid


def register(client, body: dict, headers=None) -> str:
    r = client.post("/searches/register", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()["id"]


# --------------------------------------------------------------------------- pixels


def test_difference_tile_equals_numpy_on_the_two_sources(client, sample, change):
    x, y = centre(sample)
    r = client.get(
        f"{pair_url(change)}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif", params={"preset": "ndvi-change"}
    )
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    assert got.dtype == np.float32 and got.shape == (1, 256, 256)

    # rio-tiler's own file reader on each COG, the difference taken here
    before = rio_tiler_ndvi(change["before_path"], x, y, Z)
    after = rio_tiler_ndvi(change["after_path"], x, y, Z)
    exp_valid = ~(np.ma.getmaskarray(before) | np.ma.getmaskarray(after))[0]
    assert exp_valid.sum() > 20000 and np.array_equal(valid, exp_valid)
    exp = (after.data - before.data)[0]
    np.testing.assert_allclose(got[0][valid], exp[valid], atol=1e-6)

    # independently: nearest-neighbour samples of the two files (pyproj, rasterio)
    nb, vb = nearest_ndvi(change["before_path"], x, y, Z)
    na, va = nearest_ndvi(change["after_path"], x, y, Z)
    both = valid & vb & va
    close = np.abs(got[0] - (na - nb)) < 1e-5
    assert close[both].mean() > 0.97
    # the change is what was made: NDVI down in the north, up in the south, by a clear margin
    diff = na - nb
    assert (diff[both] < -0.05).sum() > 5000 and (diff[both] > 0.05).sum() > 5000


def test_difference_png_is_the_raw_difference_through_the_legend(client, sample, change):
    x, y = centre(sample)
    base = f"{pair_url(change)}/tiles/WebMercatorQuad/{Z}/{x}/{y}"
    raw, valid = read_tif(client.get(f"{base}.tif", params={"preset": "ndvi-change"}).content)
    r = client.get(f"{base}.png", params={"preset": "ndvi-change"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    rgba = read_png(r.content).astype(int)
    assert np.array_equal(rgba[..., 3] > 0, valid)

    # sign, from numpy on the sources: a clear loss is red (rdbu's low end), a clear gain blue
    nb, vb = nearest_ndvi(change["before_path"], x, y, Z)
    na, va = nearest_ndvi(change["after_path"], x, y, Z)
    both = valid & vb & va
    loss, gain = both & (na - nb < -0.05), both & (na - nb > 0.05)
    assert loss.sum() > 5000 and gain.sum() > 5000
    assert (rgba[..., 0][loss] > rgba[..., 2][loss]).mean() > 0.99
    assert (rgba[..., 2][gain] > rgba[..., 0][gain]).mean() > 0.99

    # every pixel: the colormap entry of its value rescaled from [-0.5, 0.5] (as the legend says)
    legend = client.get("/compare/legend", params={"preset": "ndvi-change"}).json()
    lo, hi = legend["min"], legend["max"]
    assert (lo, hi) == (-0.5, 0.5) and legend["colormap_name"] == "rdbu"
    lut = np.array([rio_cmap.get("rdbu")[i] for i in range(256)])[..., :3]
    index = np.floor((np.clip(raw[0].astype("float64"), lo, hi) - lo) / (hi - lo) * 255).astype(int)
    err = np.min(
        [np.abs(rgba[..., :3] - lut[np.clip(index + d, 0, 255)]).max(axis=-1) for d in (-1, 0, 1)], axis=0
    )
    assert (err[valid] == 0).mean() > 0.99
    # the legend's stops are colormap entries of their values
    for stop in legend["stops"]:
        i = int(np.floor((stop["value"] - lo) / (hi - lo) * 255))
        assert stop["color"][:3] == lut[i].tolist()
    assert legend["stops"][0]["value"] == lo and legend["stops"][-1]["value"] == hi


def test_search_pair_equals_item_pair_and_numpy(client, sample, change):
    before = register(client, {"collections": [CH], "ids": [change["before"]]})
    after = register(client, {"collections": [CH], "ids": [change["after"]]})
    x, y = centre(sample)
    tile = f"tiles/WebMercatorQuad/{Z}/{x}/{y}.tif"
    r = client.get(f"/compare/searches/{before}/{after}/{tile}", params={"preset": "ndvi-change"})
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    items, items_valid = read_tif(
        client.get(f"{pair_url(change)}/{tile}", params={"preset": "ndvi-change"}).content
    )
    assert np.array_equal(valid, items_valid) and np.array_equal(got[:, valid], items[:, valid])
    exp = rio_tiler_ndvi(change["after_path"], x, y, Z) - rio_tiler_ndvi(change["before_path"], x, y, Z)
    np.testing.assert_allclose(got[0][valid], exp.data[0][valid], atol=1e-6)
    # reversed, the difference changes sign
    back, _ = read_tif(
        client.get(f"/compare/searches/{after}/{before}/{tile}", params={"preset": "ndvi-change"}).content
    )
    np.testing.assert_allclose(back[0][valid], -got[0][valid], atol=1e-6)


def test_tilejson_and_wmts(client, sample, change):
    r = client.get(f"{pair_url(change)}/WebMercatorQuad/tilejson.json", params={"preset": "ndvi-change"})
    assert r.status_code == 200, r.text
    tj = r.json()
    assert f"{pair_url(change)}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}" in tj["tiles"][0]
    assert "preset=ndvi-change" in tj["tiles"][0]
    w, s, e, n = tj["bounds"]
    lon, lat = lonlat_of_item_centre(sample.item(0))
    assert w < lon < e and s < lat < n and tj["minzoom"] <= Z <= tj["maxzoom"] + 2
    assert tj["raster_layers"] == {"ndvi-change": {"preset": "ndvi-change"}}
    r = client.get(f"{pair_url(change)}/WMTSCapabilities.xml")
    assert r.status_code == 200
    root = ET.fromstring(r.content)
    ows, wmts = "{http://www.opengis.net/ows/1.1}", "{http://www.opengis.net/wmts/1.0}"
    layers = {layer.findtext(f"{ows}Identifier"): layer for layer in root.iter(f"{wmts}Layer")}
    name = f"{change['before']}_{change['after']}_WebMercatorQuad_ndvi-change"
    assert name in layers
    template = layers[name].find(f"{wmts}ResourceURL").get("template")
    assert "/compare/collections/" in template and "preset=ndvi-change" in template


# --------------------------------------------------------------------------- errors


def test_bad_input_is_a_clear_4xx(client, sample, change):
    x, y = centre(sample)
    tile = f"tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    cases = [
        (f"/compare/collections/{CH}/items/nope/{change['after']}/{tile}", {}, 404, "nope"),
        (
            f"/compare/collections/no-such/items/{change['before']}/{change['after']}/{tile}",
            {},
            404,
            "no-such",
        ),
        (f"/compare/searches/deadbeef/{'0' * 32}/{tile}", {}, 404, "deadbeef"),
        (f"{pair_url(change)}/{tile}", {"preset": "nope"}, 400, "not a preset"),
        (f"{pair_url(change)}/{tile}", {"preset": "ndvi"}, 400, "single-date"),
        (
            f"{pair_url(change)}/WebMercatorQuad/tilejson.json",
            {"preset": "natural"},
            400,
            "comparison presets",
        ),
        ("/compare/legend", {"preset": "ndvi"}, 400, "ndvi-change"),
        # a comparison preset on a single item
        (f"/collections/{CH}/items/{change['before']}/{tile}", {"preset": "ndvi-change"}, 400, "/compare"),
    ]
    for url, params, status, words in cases:
        r = client.get(url, params=params)
        assert r.status_code == status, (url, r.status_code, r.text)
        assert words in r.json()["detail"], (url, r.text)
    # a tile the two dates do not both cover
    r = client.get(
        f"{pair_url(change)}/tiles/WebMercatorQuad/{Z}/{x + 40}/{y}.png", params={"preset": "ndvi-change"}
    )
    assert r.status_code == 404 and "both dates" in r.json()["detail"]


def test_two_dates_that_do_not_overlap_are_refused(client, change):
    for path in ("WebMercatorQuad/tilejson.json", "tiles/WebMercatorQuad/12/2091/1494.png"):
        r = client.get(f"/compare/collections/{CH}/items/{change['before']}/{change['far']}/{path}")
        assert r.status_code == 400 and "do not overlap" in r.json()["detail"], r.text


def test_listings_and_comparisons_stay_out_of_single_date_presets(client, change):
    body = client.get("/compare/presets").json()
    (preset,) = body["presets"]
    assert preset["name"] == "ndvi-change" and preset["kind"] == "difference" and preset["of"] == "ndvi"
    assert len(preset["legend"]["stops"]) == 11
    names = [p["name"] for p in client.get(f"/collections/{CH}/presets").json()["presets"]]
    assert "ndvi-change" not in names and "ndvi" in names
    assert "ndvi-change" not in [p["name"] for p in client.get("/presets").json()["presets"]]


# --------------------------------------------------------------------------- rights


@pytest.fixture(scope="module")
def secured(dsn, change, tmp_path_factory):
    users = [("ann", ANN_KEY, "team-a"), ("root", ROOT_KEY, "admins")]
    auth = write_auth(tmp_path_factory.mktemp("compare-auth"), POLICY, users, SIGNING)
    with TestClient(create_app(make_settings(dsn, auth=auth))) as c:
        yield c


def test_both_collections_or_searches_must_be_granted(secured, sample, change):
    ann, root = {"X-API-Key": ANN_KEY}, {"X-API-Key": ROOT_KEY}
    x, y = centre(sample)
    tile = f"tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    q = {"preset": "ndvi-change"}
    assert secured.get(f"{pair_url(change)}/{tile}", params=q, headers=ann).status_code == 200
    assert secured.get(f"{pair_url(change, LOCKED)}/{tile}", params=q, headers=ann).status_code == 403
    assert secured.get(f"{pair_url(change)}/{tile}", params=q).status_code == 401

    mine = register(secured, {"collections": [CH], "ids": [change["before"]]}, root)
    theirs = register(secured, {"collections": [LOCKED], "ids": [change["after"]]}, root)
    mine_after = register(secured, {"collections": [CH], "ids": [change["after"]]}, root)
    for before, after in ((mine, theirs), (theirs, mine)):
        r = secured.get(f"/compare/searches/{before}/{after}/{tile}", params=q, headers=ann)
        assert r.status_code == 403 and LOCKED in r.json()["detail"]
        assert (
            secured.get(f"/compare/searches/{before}/{after}/{tile}", params=q, headers=root).status_code
            == 200
        )
    assert (
        secured.get(f"/compare/searches/{mine}/{mine_after}/{tile}", params=q, headers=ann).status_code == 200
    )
    # TileJSON and WMTS need the rights too
    for path in ("WebMercatorQuad/tilejson.json", "WMTSCapabilities.xml"):
        assert secured.get(f"/compare/searches/{mine}/{theirs}/{path}", headers=ann).status_code == 403

    # a URL token scoped to one collection does not open the other
    token = secured.post("/auth/token", json={"collections": [CH]}, headers=root).json()["token"]
    assert secured.get(f"/t/{token}{pair_url(change)}/{tile}", params=q).status_code == 200
    assert secured.get(f"/t/{token}{pair_url(change, LOCKED)}/{tile}", params=q).status_code == 403
    assert secured.get(f"/t/{token}/compare/searches/{mine}/{theirs}/{tile}", params=q).status_code == 403
    assert secured.get(f"/t/{token}/compare/searches/{mine}/{mine_after}/{tile}", params=q).status_code == 200
    # a token limited to one search opens no pair of two different searches
    token = secured.post("/auth/token", json={"search": mine}, headers=root).json()["token"]
    r = secured.get(f"/t/{token}/compare/searches/{mine}/{mine_after}/{tile}", params=q)
    assert r.status_code == 403 and "one search" in r.json()["detail"]
    # the TileJSON's tile URLs carry the token
    tj = secured.get(f"/t/{token}/compare/searches/{mine}/{mine}/WebMercatorQuad/tilejson.json").json()
    assert re.search(rf"/t/{re.escape(token)}/compare/searches/", tj["tiles"][0])


# --------------------------------------------------------------------------- viewer


def _dump(url: str) -> str:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=20000",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
            "--window-size=1000,700",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@needs_chromium
@pytest.mark.parametrize("mode", ["swipe", "difference"])
def test_viewer_loads_both_dates_and_the_difference(live_server, change, mode):
    url = (
        f"{live_server}/compare/viewer?collection={CH}&before={change['before']}"
        f"&after={change['after']}&preset=ndvi-change&mode={mode}"
    )
    out = _dump(url)
    status = re.search(r'<div[^>]*id="status"[^>]*>', out.stdout)
    assert status, out.stdout[-2000:]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', status.group(0)))
    assert int(attrs["before"]) > 0 and int(attrs["after"]) > 0, attrs  # both dates requested and drew tiles
    if mode == "difference":
        assert int(attrs["difference"]) > 0, attrs
    assert attrs["errors"] == "", attrs  # console errors and failed tiles, as the page saw them
    assert "stop" in out.stdout and "-0.5" in out.stdout  # the legend
    assert "Uncaught" not in out.stderr  # Chromium's own log of the page's console


@needs_chromium
def test_viewer_page_switches_to_the_comparison(live_server, change):
    url = f"{live_server}/viewer?collection={CH}&before={change['before']}&after={change['after']}&compare=ndvi-change"
    dom = _dump(url).stdout
    assert 'option value="ndvi-change"' in dom
    src = re.search(r'<iframe[^>]*src="([^"]*)"', dom).group(1).replace("&amp;", "&")
    assert "/compare/viewer?" in src and f"before={change['before']}" in src and "preset=ndvi-change" in src
