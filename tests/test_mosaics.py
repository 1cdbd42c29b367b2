"""Collection and search mosaics: the right scene wins where scenes overlap."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import (
    expected_nearest,
    lonlat_of_item_centre,
    mercator_tile,
    mercator_tile_centres,
    read_png,
    read_tif,
)

C = "spot67-demo"
Z = 15


def overlap_tile(sample, a: int, b: int) -> tuple[int, int]:
    """Tile at the midpoint of two scenes' centres (covered by both)."""
    (lon1, lat1), (lon2, lat2) = lonlat_of_item_centre(sample.item(a)), lonlat_of_item_centre(sample.item(b))
    return mercator_tile((lon1 + lon2) / 2, (lat1 + lat2) / 2, Z)


def scene_pixels(sample, i, x, y):
    return expected_nearest(sample.path(i, "ms"), *mercator_tile_centres(x, y, Z))


def check_winner(got, got_valid, sample, x, y, winner: int, loser: int):
    win, win_valid = scene_pixels(sample, winner, x, y)
    lose, lose_valid = scene_pixels(sample, loser, x, y)
    both = win_valid & lose_valid & got_valid
    assert both.sum() > 5000, "the tile must contain a real overlap"
    # the two scenes differ there (different gains), so the test can tell them apart
    assert np.all(win[:, both] != lose[:, both], axis=0).mean() > 0.9
    assert np.all(got[:, both] == win[:, both], axis=0).mean() > 0.97
    # where only the loser has data, the mosaic fills from it
    only_loser = lose_valid & ~win_valid & got_valid
    if only_loser.sum() > 100:
        assert np.all(got[:, only_loser] == lose[:, only_loser], axis=0).mean() > 0.97


def test_collection_mosaic_newest_scene_on_top(client, sample):
    x, y = overlap_tile(sample, 0, 1)
    r = client.get(f"/collections/{C}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif", params={"assets": "ms"})
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    check_winner(got, valid, sample, x, y, winner=1, loser=0)  # S01 is newer than S00


def test_collection_mosaic_sortby_ascending(client, sample):
    x, y = overlap_tile(sample, 0, 1)
    r = client.get(
        f"/collections/{C}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif",
        params={"assets": "ms", "sortby": "datetime"},
    )
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    check_winner(got, valid, sample, x, y, winner=0, loser=1)


def test_registered_search_with_cql2_filter(client, sample):
    # only S00 has cloud cover <= 5
    body = {
        "collections": [C],
        "filter-lang": "cql2-json",
        "filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 5]},
    }
    r = client.post("/searches/register", json=body)
    assert r.status_code == 200, r.text
    search_id = r.json()["id"]
    links = {link["rel"]: link["href"] for link in r.json()["links"]}
    assert "tilejson" in links and "wmts" in links

    x, y = overlap_tile(sample, 0, 1)
    r = client.get(f"/searches/{search_id}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif", params={"assets": "ms"})
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    s0, s0_valid = scene_pixels(sample, 0, x, y)
    s1, s1_valid = scene_pixels(sample, 1, x, y)
    # S01 is filtered out: its pixels never appear, S00's do
    assert not (valid & s1_valid & ~s0_valid).any()
    both = valid & s0_valid
    assert np.all(got[:, both] == s0[:, both], axis=0).mean() > 0.97

    # the same search with a bbox restricted elsewhere returns nothing
    r = client.get(f"/searches/{search_id}/info")
    assert r.status_code == 200 and r.json()["search"]["search"]["filter"]["op"] == "<="


def test_search_cql2_text_rejected_and_bbox_search(client, sample):
    # registration takes CQL2-JSON only: CQL2 text is a clear 422, not a 500
    r = client.post(
        "/searches/register",
        json={"collections": [C], "filter-lang": "cql2-text", "filter": "platform = 'spot-7'"},
    )
    assert r.status_code == 422 and "detail" in r.json()

    # a small bbox in the south-east part of S02, away from S01: only S02 is selected
    lon, lat = lonlat_of_item_centre(sample.item(2))
    lon, lat = lon + 0.005, lat - 0.002
    r = client.post(
        "/searches/register",
        json={"collections": [C], "bbox": [lon - 0.0005, lat - 0.0005, lon + 0.0005, lat + 0.0005]},
    )
    assert r.status_code == 200
    sid = r.json()["id"]
    x, y = overlap_tile(sample, 0, 1)
    r = client.get(f"/searches/{sid}/tiles/WebMercatorQuad/{Z}/{x}/{y}/assets")
    ids = {a["id"] for a in r.json()}
    assert not ids & {sample.item(0)["id"], sample.item(1)["id"]}
    x, y = mercator_tile(lon, lat, Z)
    r = client.get(f"/searches/{sid}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif", params={"assets": "ms"})
    assert r.status_code == 200
    got, valid = read_tif(r.content)
    s2, v2 = scene_pixels(sample, 2, x, y)
    both = valid & v2
    assert np.all(got[:, both] == s2[:, both], axis=0).mean() > 0.97


def test_mosaic_pixel_selection_and_point(client, sample):
    x, y = overlap_tile(sample, 0, 1)
    r = client.get(
        f"/collections/{C}/tiles/WebMercatorQuad/{Z}/{x}/{y}.tif",
        params={"assets": "ms", "pixel_selection": "highest"},
    )
    assert r.status_code == 200
    got, valid = read_tif(r.content)
    s0, v0 = scene_pixels(sample, 0, x, y)
    s1, v1 = scene_pixels(sample, 1, x, y)
    both = valid & v0 & v1
    # "highest" keeps the per-pixel maximum: with gains 1.0 and 1.12, that is S01
    exp = np.maximum(s0, s1)
    assert np.all(got[:, both] == exp[:, both], axis=0).mean() > 0.97

    lon, lat = lonlat_of_item_centre(sample.item(2))
    r = client.get(f"/collections/{C}/point/{lon},{lat}", params={"assets": "ms"})
    assert r.status_code == 200
    names = [a["name"] for a in r.json()["assets"]]
    assert any(sample.item(2)["id"] in n for n in names)


def test_mosaic_empty_area_is_204(client):
    r = client.get(f"/collections/{C}/tiles/WebMercatorQuad/{Z}/100/100.png", params={"assets": "ms"})
    assert r.status_code == 204
    assert r.content == b""


def test_mosaic_assets_for_tile(client, sample):
    x, y = overlap_tile(sample, 0, 1)
    r = client.get(f"/collections/{C}/tiles/WebMercatorQuad/{Z}/{x}/{y}/assets")
    assert r.status_code == 200
    ids = {a["id"] for a in r.json()}
    assert {sample.item(0)["id"], sample.item(1)["id"]} <= ids


def test_mosaic_tilejson_wmts_and_png(client, sample):
    r = client.get(
        f"/collections/{C}/WebMercatorQuad/tilejson.json",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"},
    )
    tj = r.json()
    w, s, e, n = tj["bounds"]
    for it in sample.items:
        assert w <= it["bbox"][0] + 1e-6 and e >= it["bbox"][2] - 1e-6
    assert tj["raster_layers"]["natural"] == {"preset": "natural"}
    assert list(tj["raster_layers"]) == ["natural", "false-color", "ndvi", "panchromatic", "pansharpened"]

    r = client.get(
        f"/collections/{C}/WMTSCapabilities.xml", params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"}
    )
    assert r.status_code == 200
    assert "ResourceURL" in r.text and "WebMercatorQuad" in r.text

    x, y = overlap_tile(sample, 1, 2)
    for fmt, ctype in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
        r = client.get(
            f"/collections/{C}/tiles/WebMercatorQuad/{Z}/{x}/{y}.{fmt}",
            params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"},
        )
        assert r.status_code == 200 and r.headers["content-type"] == ctype
        img = read_png(r.content)
        assert img[..., :3].std() > 10


@pytest.mark.parametrize(
    "url,params,codes",
    [
        ("/collections/NOPE/tiles/WebMercatorQuad/15/1/1.png", {"assets": "ms"}, {404}),
        ("/searches/0000deadbeef/tiles/WebMercatorQuad/15/1/1.png", {"assets": "ms"}, {404}),
        (
            f"/collections/{C}/tiles/WebMercatorQuad/15/1/1.png",
            {"assets": "ms", "pixel_selection": "bogus"},
            {422},
        ),
        (f"/collections/{C}/tiles/WebMercatorQuad/15/1/1.png", {"assets": "ms", "bbox": "1,2,3"}, {400, 422}),
        (f"/collections/{C}/tiles/WebMercatorQuad/15/1/1.png", {"assets": "ms", "filter": "((("}, {400, 422}),
        (
            f"/collections/{C}/tiles/WebMercatorQuad/15/1/1.png",
            {"assets": "ms", "datetime": "notadate"},
            {400, 422},
        ),
    ],
)
def test_mosaic_bad_parameters_are_4xx_json(client, url, params, codes):
    r = client.get(url, params=params)
    assert r.status_code in codes, (r.status_code, r.text)
    assert "detail" in r.json()


def test_register_bad_body_is_422(client):
    r = client.post("/searches/register", json={"collections": "notalist", "bbox": [1, 2]})
    assert r.status_code == 422
    r = client.post("/searches/register", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("tms", ["WebMercatorQuad", "LAMB93"])
def test_mosaic_tilejson_zooms_come_from_the_data(client, sample, tms):
    """Not 0-24 over the world: the newest item's range, computed here from its pan grid."""
    import math

    from pyproj import Transformer

    from tiler.tms import supported_tms

    tj = client.get(f"/collections/{C}/{tms}/tilejson.json").json()
    grid = supported_tms.get(tms)
    newest = max(sample.items, key=lambda it: it["properties"]["datetime"])
    pan = newest["assets"]["pan"]
    x0, y0 = pan["proj:transform"][2], pan["proj:transform"][5]
    size = pan["proj:shape"][0] * pan["proj:transform"][0]
    tr = Transformer.from_crs(f"EPSG:{newest['properties']['proj:epsg']}", grid.crs.srs, always_xy=True)
    xs, ys = tr.transform([x0, x0 + size], [y0, y0 - size])
    res = abs(xs[1] - xs[0]) / pan["proj:shape"][0]  # pan resolution in the grid's units
    # the finest level whose cells are not smaller than the pan pixels... within one level
    finest = min(range(len(grid.tileMatrices)), key=lambda z: abs(math.log2(grid.matrix(z).cellSize / res)))
    assert abs(tj["maxzoom"] - finest) <= 1 and tj["maxzoom"] >= 14
    assert 8 <= tj["minzoom"] < tj["maxzoom"]
    # explicit values still win
    tj = client.get(f"/collections/{C}/{tms}/tilejson.json", params={"minzoom": 3, "maxzoom": 20}).json()
    assert (tj["minzoom"], tj["maxzoom"]) == (3, 20)
