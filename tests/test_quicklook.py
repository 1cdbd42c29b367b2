"""Quicklook fallback: below the zoom the COGs' overviews serve, tiles come from the quicklook asset."""

from __future__ import annotations

import numpy as np
from conftest import RECORDED as T
from helpers import expected_nearest, lonlat_of_item_centre, mercator_tile, mercator_tile_centres, read_png
from test_presets import item_stretch, stretch8

from tiler.upstream import clear_http_cache


def files_read(server) -> set[str]:
    return {path.rsplit("/", 1)[-1].rsplit("_", 1)[-1] for path, _ in server.ranges}  # MS.tif, PAN.tif, QL.tif


def tile(client, server, base: str, z: int, lonlat, **params):
    server.ranges.clear()
    clear_http_cache(server.url)
    x, y = mercator_tile(*lonlat, z)
    r = client.get(f"{base}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params=params)
    assert r.status_code == 200, r.text
    return r, x, y


def test_item_tiles_below_the_cog_minzoom_come_from_the_quicklook(client, db, sample, recorded):
    item = sample.item(0)
    base = f"/collections/{T}/items/{item['id']}"
    minzoom = client.get(f"{base}/WebMercatorQuad/tilejson.json").json()["minzoom"]
    centre = lonlat_of_item_centre(item)

    r, x, y = tile(client, recorded, base, minzoom - 1, centre)
    assert files_read(recorded) == {"QL.tif"}
    img = read_png(r.content)
    exp, valid = expected_nearest(sample.path(0, "overview"), *mercator_tile_centres(x, y, minzoom - 1))
    exp = stretch8(exp, item_stretch(db, sample, 0, "overview", ["red", "green", "blue"]))
    both = valid & (img[..., 3] > 0)
    assert both.sum() > 500
    assert (np.abs(img[..., :3].astype(int) - np.moveaxis(exp, 0, -1).astype(int)).max(axis=-1)[both] <= 1).mean() > 0.95

    # at the minzoom the COGs are read, not the quicklook
    tile(client, recorded, base, minzoom, centre)
    assert "MS.tif" in files_read(recorded) and "QL.tif" not in files_read(recorded)
    # a preset the quicklook cannot show (no NIR) reads the COGs at any zoom
    tile(client, recorded, base, minzoom - 1, centre, preset="ndvi")
    assert files_read(recorded) == {"MS.tif"}


def test_mosaic_tiles_below_minzoom_read_only_quicklooks(client, sample, recorded):
    base = f"/collections/{T}"
    minzoom = client.get(f"{base}/WebMercatorQuad/tilejson.json").json()["minzoom"]
    r, _, _ = tile(client, recorded, base, minzoom - 1, lonlat_of_item_centre(sample.item(1)))
    assert files_read(recorded) == {"QL.tif"}
    img = read_png(r.content)
    assert (img[..., 3] > 0).mean() > 0.01 and img[..., 1][img[..., 3] > 0].std() > 5
