"""STAC item and asset endpoints: pixels against numpy on the source COGs."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Transformer

from tests.helpers import (
    expected_nearest,
    item_centre_tile,
    lonlat_of_item_centre,
    mercator_tile_centres,
    read_png,
    read_tif,
)

C = "spot67-demo"


def item_url(sample, i: int) -> str:
    return f"/collections/{C}/items/{sample.item(i)['id']}"


def assert_pixels_match(got, got_valid, exp, exp_valid, min_match=0.97):
    both = got_valid & exp_valid
    assert both.sum() > 1000, "tile should cover the scene"
    # the footprint seen by the server is the one in the source file
    assert (got_valid == exp_valid).mean() > 0.97
    equal = np.all(got[:, both] == exp[:, both], axis=0)
    assert equal.mean() >= min_match, f"only {equal.mean():.3f} of pixels match the source"


@pytest.mark.parametrize("asset,z", [("ms", 15), ("pan", 17)])
def test_item_tile_pixels_equal_source(client, sample, asset, z):
    x, y = item_centre_tile(sample.item(0), z)
    r = client.get(f"{item_url(sample, 0)}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif", params={"assets": asset})
    assert r.status_code == 200, r.text
    got, got_valid = read_tif(r.content)
    xs, ys = mercator_tile_centres(x, y, z)
    exp, exp_valid = expected_nearest(sample.path(0, asset), xs, ys)
    assert got.shape == exp.shape
    assert_pixels_match(got, got_valid, exp, exp_valid)


def test_item_tile_band_order_and_rescale(client, sample):
    z = 15
    x, y = item_centre_tile(sample.item(1), z)
    r = client.get(
        f"{item_url(sample, 1)}/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = read_png(r.content)
    assert img.shape == (256, 256, 4)
    xs, ys = mercator_tile_centres(x, y, z)
    exp, valid = expected_nearest(sample.path(1, "ms"), xs, ys)
    rgb = exp[[2, 1, 0]].astype("float64")  # red, green, blue from B2, B1, B0
    exp8 = np.clip((rgb - 200) / 1600 * 255, 0, 255)
    both = valid & (img[..., 3] > 0)
    diff = np.abs(np.moveaxis(img[..., :3], -1, 0)[:, both].astype("float64") - exp8[:, both])
    assert (diff.max(axis=0) <= 1).mean() > 0.97
    # band order matters: swapping red and blue would not match
    swapped = np.abs(np.moveaxis(img[..., :3], -1, 0)[[2, 1, 0]][:, both] - exp8[:, both])
    assert (swapped.max(axis=0) <= 1).mean() < 0.5


def test_item_tile_expression(client, sample):
    z = 15
    x, y = item_centre_tile(sample.item(0), z)
    r = client.get(
        f"{item_url(sample, 0)}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif",
        params={"assets": "ms", "expression": "(b4-b3)/(b4+b3)"},
    )
    assert r.status_code == 200, r.text
    got, got_valid = read_tif(r.content)
    xs, ys = mercator_tile_centres(x, y, z)
    exp, valid = expected_nearest(sample.path(0, "ms"), xs, ys)
    nir, red = exp[3].astype("float64"), exp[2].astype("float64")
    ndvi = (nir - red) / (nir + red)
    both = valid & got_valid
    close = np.abs(got[0][both] - ndvi[both]) < 1e-4
    assert close.mean() > 0.97
    assert ndvi[both].max() > 0.5 and ndvi[both].min() < 0.2  # vegetation and non-vegetation in view


def test_item_tile_outside_bounds_is_404(client, sample):
    r = client.get(f"{item_url(sample, 0)}/tiles/WebMercatorQuad/15/0/0.png", params={"assets": "ms"})
    assert r.status_code == 404
    assert "detail" in r.json()


def test_item_point_equals_source_pixel(client, sample):
    lon, lat = lonlat_of_item_centre(sample.item(2))
    r = client.get(f"{item_url(sample, 2)}/point/{lon},{lat}", params={"assets": "ms"})
    assert r.status_code == 200, r.text
    values = r.json()["values"]
    import rasterio

    with rasterio.open(sample.path(2, "ms")) as src:
        ex, ey = Transformer.from_crs("EPSG:4326", src.crs, always_xy=True).transform(lon, lat)
        row, col = src.index(ex, ey)
        assert values == src.read()[:, row, col].astype(float).tolist()


def test_item_preview_and_statistics(client, sample):
    r = client.get(
        f"{item_url(sample, 0)}/preview.png",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800", "max_size": 128},
    )
    assert r.status_code == 200
    img = read_png(r.content)
    assert max(img.shape[:2]) == 128
    assert img[..., 3].mean() > 100  # mostly valid pixels
    assert img[..., :3][img[..., 3] > 0].std() > 10  # real structure, not flat

    r = client.get(f"{item_url(sample, 0)}/statistics", params={"assets": "ms", "max_size": 256})
    assert r.status_code == 200, r.text
    stats = r.json()
    import rasterio

    with rasterio.open(sample.path(0, "ms")) as src:
        arr = src.read(masked=True)
    for b in range(4):
        s = stats[f"b{b + 1}"]
        assert s["min"] == float(arr[b].min())
        assert s["max"] == float(arr[b].max())
        assert abs(s["mean"] - float(arr[b].mean())) < 1e-6 * float(arr[b].mean()) + 1e-3


def test_item_info_tilejson_and_wmts(client, sample):
    item = sample.item(0)
    r = client.get(f"{item_url(sample, 0)}/info", params={"assets": ":all:"})
    assert r.status_code == 200
    info = r.json()
    assert set(info) == {"ms", "pan", "overview"}
    assert info["pan"]["width"] == item["assets"]["pan"]["proj:shape"][1]

    r = client.get(f"{item_url(sample, 0)}/WebMercatorQuad/tilejson.json", params={"assets": "ms"})
    tj = r.json()
    assert tj["tilejson"] == "3.0.0"
    assert all(abs(a - b) < 1e-3 for a, b in zip(tj["bounds"], item["bbox"], strict=True))
    assert tj["tiles"][0].startswith("http://testserver/collections/")

    r = client.get(f"{item_url(sample, 0)}/WMTSCapabilities.xml", params={"assets": "ms"})
    assert r.status_code == 200 and "xml" in r.headers["content-type"]
    assert "WebMercatorQuad" in r.text and "CDB1GlobalGrid" not in r.text


def test_item_bbox_image(client, sample):
    w, s, e, n = sample.item(0)["bbox"]
    cx, cy = (w + e) / 2, (s + n) / 2
    r = client.get(
        f"{item_url(sample, 0)}/bbox/{cx - 0.002},{cy - 0.002},{cx + 0.002},{cy + 0.002}/100x100.png",
        params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800"},
    )
    assert r.status_code == 200, r.text
    assert read_png(r.content).shape == (100, 100, 4)


def test_asset_endpoint_tile_and_unknown_asset(client, sample):
    z = 17
    x, y = item_centre_tile(sample.item(0), z)
    r = client.get(f"{item_url(sample, 0)}/assets/pan/tiles/WebMercatorQuad/{z}/{x}/{y}.tif")
    assert r.status_code == 200, r.text
    got, got_valid = read_tif(r.content)
    exp, exp_valid = expected_nearest(sample.path(0, "pan"), *mercator_tile_centres(x, y, z))
    assert_pixels_match(got, got_valid, exp, exp_valid)

    r = client.get(f"{item_url(sample, 0)}/assets/nope/info")
    assert r.status_code == 404
    assert "nope" in r.json()["detail"]


@pytest.mark.parametrize(
    "path,params,codes",
    [
        ("/items/NOPE/info", {"assets": "ms"}, {404}),
        ("/items/{item}/tiles/NoSuchTMS/15/1/1.png", {"assets": "ms"}, {422}),
        ("/items/{item}/tiles/WebMercatorQuad/15/1/1.png", {"assets": "nope"}, {400, 404}),
        ("/items/{item}/tiles/WebMercatorQuad/15/1/1.png", {"preset": "nope"}, {400}),
        ("/items/{item}/preview.png", {"assets": "ms", "rescale": "abc"}, {400, 422}),
        ("/items/{item}/preview.png", {"assets": "ms", "expression": "b1+"}, {400, 422}),
        ("/items/{item}/preview.png", {"assets": "ms", "max_size": "-5"}, {400, 422}),
        ("/items/{item}/tiles/WebMercatorQuad/15/1/1.xyz", {"assets": "ms"}, {404, 422}),
    ],
)
def test_item_bad_parameters_are_4xx_json(client, sample, path, params, codes):
    url = f"/collections/{C}" + path.format(item=sample.item(0)["id"])
    r = client.get(url, params=params)
    assert r.status_code in codes, (r.status_code, r.text)
    assert "detail" in r.json()
