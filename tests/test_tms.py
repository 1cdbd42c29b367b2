"""Lambert-93 (IGN LAMB93) and UTM 30/31/32 grids: figures, tile arithmetic, pixels, WMTS."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from tests.helpers import expected_nearest, grid_tile, grid_tile_centres, lonlat_of_item_centre, read_tif
from tiler.tms import supported_tms

C = "spot67-demo"

# IGN figures, typed in from sources other than the ones tiler/tms.py was written from:
# ScaleDenominator, MatrixWidth, MatrixHeight of TileMatrixSet LAMB93 in a recorded Géoportail
# WMTS GetCapabilities (SupportedCRS EPSG:2154, TopLeftCorner "0 12000000", 256 px tiles).
IGN_CAPABILITIES = [
    (373497230.5353357571875677, 2, 2),
    (186705472.6921089404495433, 2, 2),
    (93341025.2806978682347108, 2, 2),
    (46667469.2207142901243060, 2, 3),
    (23332959.3004053602435306, 2, 5),
    (11666284.0159382160591122, 3, 9),
    (5833092.8735621436167094, 5, 16),
    (2916534.1249500003143567, 8, 30),
    (1458263.9809885714915936, 14, 59),
    (729131.2196817857459905, 26, 117),
    (364565.4170828571558332, 51, 232),
    (182282.6603450000154965, 100, 462),
    (91141.3181225000130965, 199, 922),
    (45570.6560485714301016, 396, 1842),
    (22785.3272714285733418, 791, 3682),
    (11392.6634475000012445, 1581, 7363),
    (5696.3316767857149872, 3161, 14724),
    (2848.1658267857144691, 6321, 29447),
    (1424.0829103571428959, 12641, 58892),
    (712.0414546428572171, 25281, 117782),
    (356.0207275000000519, 50561, 235563),
    (178.0103635714285826, 101121, 471125),
]
# Resolutions (m/px) hard-coded in IGN's Leaflet extension, IGNF/geoportal-extensions,
# src/Leaflet/CRS/EPSG2154.js, with origin [0, 12000000].
IGN_LEAFLET_RESOLUTIONS = [
    104579.22454989408, 52277.53235379051, 26135.487078595408, 13066.891381800004,
    6533.228604113456, 3266.5595244626675, 1633.2660045974187, 816.6295549860224,
    408.31391467683596, 204.15674151090204, 102.07831678324082, 51.0391448966112,
    25.519569074269395, 12.759783693647506, 6.379891635966491, 3.18994576530532,
    1.5949728694977277, 0.7974864315474559, 0.398743214900604, 0.19937160727567999,
    0.099685803696052, 0.049842901818919996,
]  # fmt: skip
LAMB93_ORIGIN = (0.0, 12_000_000.0)

# OGC UTM31WGS84Quad (TMS 2.0 standard): origin and level-1 cell size; level z halves it z-1 times.
UTM_ORIGIN = (-9501965.72931276, 20003931.4586255)
UTM_CELL_1 = 78140.3572602559

NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}

PLACES = {  # lon, lat
    "Paris": (2.3522, 48.8566),
    "Montpellier": (3.8767, 43.6108),
    "Brest": (-4.4861, 48.3904),
    "Strasbourg": (7.7521, 48.5734),
    "Ajaccio": (8.7369, 41.9192),
}


def lamb93_cell(z: int) -> float:
    return IGN_CAPABILITIES[z][0] * 0.28e-3


def utm_cell(z: int) -> float:
    return UTM_CELL_1 / 2 ** (z - 1)


def item_url(sample, i: int) -> str:
    return f"/collections/{C}/items/{sample.item(i)['id']}"


def test_lamb93_levels_equal_ign_figures():
    tms = supported_tms.get("LAMB93")
    assert tms.crs.to_epsg() == 2154
    assert [m.id for m in tms.tileMatrices] == [str(z) for z in range(22)]
    for z, ((scale, width, height), res) in enumerate(
        zip(IGN_CAPABILITIES, IGN_LEAFLET_RESOLUTIONS, strict=True)
    ):
        m = tms.matrix(z)
        assert m.scaleDenominator == pytest.approx(scale, rel=1e-12), z
        # the Leaflet list carries more digits than the capabilities' 10 decimals of a metre
        assert m.cellSize == pytest.approx(res, abs=1e-10), z
        assert (m.matrixWidth, m.matrixHeight) == (width, height), z
        assert (m.tileWidth, m.tileHeight) == (256, 256)
        assert tuple(m.pointOfOrigin) == LAMB93_ORIGIN
        assert m.cornerOfOrigin == "topLeft"


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("z", [0, 5, 10, 14, 17, 21])
def test_lamb93_tile_bounds_match_arithmetic(place, z):
    tms = supported_tms.get("LAMB93")
    lon, lat = PLACES[place]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)
    cell = lamb93_cell(z)
    col, row = grid_tile(x, y, LAMB93_ORIGIN, cell)
    tile = tms.tile(lon, lat, z)
    assert (tile.x, tile.y) == (col, row)
    span = 256 * cell
    expected = (col * span, 12e6 - (row + 1) * span, (col + 1) * span, 12e6 - row * span)
    assert tms.xy_bounds(tile) == pytest.approx(expected, abs=1e-4)
    # inside IGN's matrix for that level
    assert 0 <= col < IGN_CAPABILITIES[z][1] and 0 <= row < IGN_CAPABILITIES[z][2]


@pytest.mark.parametrize("zone", [30, 31, 32])
def test_utm_grids_follow_ogc_utm31_definition(zone):
    tms = supported_tms.get(f"UTM{zone}WGS84Quad")
    assert tms.crs.to_epsg() == 32600 + zone
    assert tms.minzoom == 1 and tms.maxzoom == 24
    for z in (1, 10, 15, 24):
        m = tms.matrix(z)
        assert m.cellSize == pytest.approx(utm_cell(z), rel=1e-12)
        assert tuple(m.pointOfOrigin) == UTM_ORIGIN
        assert (m.matrixWidth, m.matrixHeight) == (2 ** (z - 1), 2**z)
    lon, lat = PLACES["Montpellier"]
    x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{32600 + zone}", always_xy=True).transform(lon, lat)
    tile = tms.tile(lon, lat, 15)
    assert (tile.x, tile.y) == grid_tile(x, y, UTM_ORIGIN, utm_cell(15))


def check_tile_pixels(r, path, col, row, origin, cell, epsg):
    assert r.status_code == 200, r.text
    # georeferencing of the response: origin + col * tile span, cell size from the grid
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == epsg
        t = ds.transform
        assert (t.a, -t.e) == pytest.approx((cell, cell), rel=1e-9)
        assert (t.c, t.f) == pytest.approx(
            (origin[0] + col * 256 * cell, origin[1] - row * 256 * cell), abs=1e-4
        )
    got, got_valid = read_tif(r.content)
    exp, exp_valid = expected_nearest(path, *grid_tile_centres(col, row, origin, cell), f"EPSG:{epsg}")
    assert got.shape == exp.shape
    both = got_valid & exp_valid
    assert both.sum() > 1000, "tile should cover the scene"
    assert (got_valid == exp_valid).mean() > 0.97
    equal = np.all(got[:, both] == exp[:, both], axis=0)
    assert equal.mean() >= 0.97, f"only {equal.mean():.3f} of pixels match the source"


@pytest.mark.parametrize("asset,z", [("ms", 15), ("pan", 17)])
def test_item_tile_in_lamb93_equals_source(client, sample, asset, z):
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)
    col, row = grid_tile(x, y, LAMB93_ORIGIN, lamb93_cell(z))
    r = client.get(f"{item_url(sample, 0)}/tiles/LAMB93/{z}/{col}/{row}.tif", params={"assets": asset})
    check_tile_pixels(r, sample.path(0, asset), col, row, LAMB93_ORIGIN, lamb93_cell(z), 2154)


@pytest.mark.parametrize("zone", [30, 32])
def test_item_tile_in_utm_neighbour_zones_equals_source(client, sample, zone):
    z = 15
    lon, lat = lonlat_of_item_centre(sample.item(1))
    epsg = 32600 + zone
    x, y = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, lat)
    col, row = grid_tile(x, y, UTM_ORIGIN, utm_cell(z))
    r = client.get(
        f"{item_url(sample, 1)}/tiles/UTM{zone}WGS84Quad/{z}/{col}/{row}.tif", params={"assets": "ms"}
    )
    check_tile_pixels(r, sample.path(1, "ms"), col, row, UTM_ORIGIN, utm_cell(z), epsg)


def test_tilematrixsets_lists_french_grids(client):
    r = client.get("/tileMatrixSets")
    assert r.status_code == 200
    ids = [t["id"] for t in r.json()["tileMatrixSets"]]
    for tms_id in ("LAMB93", "UTM30WGS84Quad", "UTM31WGS84Quad", "UTM32WGS84Quad", "WebMercatorQuad"):
        assert tms_id in ids
    assert "CDB1GlobalGrid" not in ids
    r = client.get("/tileMatrixSets/LAMB93")
    assert r.status_code == 200
    doc = r.json()
    assert doc["crs"].endswith("/EPSG/0/2154")
    assert len(doc["tileMatrices"]) == 22
    assert doc["tileMatrices"][14]["cellSize"] == pytest.approx(lamb93_cell(14), rel=1e-12)


def test_item_tilejson_in_lamb93(client, sample):
    r = client.get(f"{item_url(sample, 0)}/LAMB93/tilejson.json", params={"assets": "ms"})
    assert r.status_code == 200, r.text
    tj = r.json()
    assert "/tiles/LAMB93/{z}/{x}/{y}" in tj["tiles"][0]
    # the item's finest asset is the 1.5 m pan: IGN level 16 is 1.59 m, level 17 0.80 m
    assert tj["maxzoom"] == 16


def layers_by_tms(xml_text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml_text)
    return {
        layer.find("w:TileMatrixSetLink/w:TileMatrixSet", NS).text: layer
        for layer in root.findall("w:Contents/w:Layer", NS)
    }


def corners(box: ET.Element) -> tuple[float, float, float, float]:
    lower = [float(v) for v in box.find("ows:LowerCorner", NS).text.split()]
    upper = [float(v) for v in box.find("ows:UpperCorner", NS).text.split()]
    return (*lower, *upper)


def test_item_wmts_lamb93_bounding_box_and_matrix_set(client, sample):
    item = sample.item(0)
    r = client.get(f"{item_url(sample, 0)}/WMTSCapabilities.xml", params={"assets": "ms"})
    assert r.status_code == 200
    layers = layers_by_tms(r.text)
    assert {"LAMB93", "UTM30WGS84Quad", "UTM31WGS84Quad", "UTM32WGS84Quad"} <= set(layers)

    layer = layers["LAMB93"]
    boxes = layer.findall("ows:BoundingBox", NS)
    assert len(boxes) == 1 and boxes[0].get("crs") == "urn:ogc:def:crs:EPSG::2154"
    got = corners(boxes[0])
    # the item's raster extent (proj:bbox, UTM 31N) projected to Lambert-93
    utm_to_l93 = Transformer.from_crs("EPSG:32631", "EPSG:2154", always_xy=True)
    native = item["assets"]["ms"]["proj:bbox"]
    assert got == pytest.approx(utm_to_l93.transform_bounds(*native, densify_pts=21), abs=0.01)
    # ... which is what the layer's WGS84BoundingBox describes too, only tighter than its envelope
    w84 = corners(layer.find("ows:WGS84BoundingBox", NS))
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    loose = to_l93.transform_bounds(*w84, densify_pts=21)
    assert loose[0] < got[0] and loose[1] < got[1] and got[2] < loose[2] and got[3] < loose[3]
    # the footprint, projected independently, lies inside the box
    ring = np.array(item["geometry"]["coordinates"][0])
    fx, fy = to_l93.transform(ring[:, 0], ring[:, 1])
    assert got[0] <= fx.min() and fx.max() <= got[2] and got[1] <= fy.min() and fy.max() <= got[3]
    assert got[2] - got[0] < 1600 and got[3] - got[1] < 1600  # a 1.5 km scene, not a whole grid

    # the limits at level 15 include the tile holding the scene centre
    cx, cy = to_l93.transform(*lonlat_of_item_centre(item))
    col, row = grid_tile(cx, cy, LAMB93_ORIGIN, lamb93_cell(15))
    limits = {
        lim.find("w:TileMatrix", NS).text: lim
        for lim in layer.findall("w:TileMatrixSetLink/w:TileMatrixSetLimits/w:TileMatrixLimits", NS)
    }
    lim = limits["15"]
    assert int(lim.find("w:MinTileCol", NS).text) <= col <= int(lim.find("w:MaxTileCol", NS).text)
    assert int(lim.find("w:MinTileRow", NS).text) <= row <= int(lim.find("w:MaxTileRow", NS).text)

    # the TileMatrixSet published in the capabilities is IGN's
    root = ET.fromstring(r.text)
    tms = next(
        t
        for t in root.findall("w:Contents/w:TileMatrixSet", NS)
        if t.find("ows:Identifier", NS).text == "LAMB93"
    )
    assert "2154" in tms.find("ows:SupportedCRS", NS).text
    matrices = tms.findall("w:TileMatrix", NS)
    assert len(matrices) == 22
    for m, (scale, width, height) in zip(matrices, IGN_CAPABILITIES, strict=True):
        assert float(m.find("w:ScaleDenominator", NS).text) == pytest.approx(scale, rel=1e-12)
        assert [float(v) for v in m.find("w:TopLeftCorner", NS).text.split()] == [0.0, 12e6]
        assert int(m.find("w:MatrixWidth", NS).text) == width
        assert int(m.find("w:MatrixHeight", NS).text) == height


def test_wmts_bounding_boxes_follow_crs_axis_order(client, sample):
    item = sample.item(0)
    native = item["assets"]["ms"]["proj:bbox"]
    r = client.get(f"{item_url(sample, 0)}/WMTSCapabilities.xml", params={"assets": "ms"})
    layers = layers_by_tms(r.text)
    # EPSG:4326 is latitude first; the same extent as the WGS84BoundingBox (longitude first)
    box = layers["WGS1984Quad"].find("ows:BoundingBox", NS)
    assert box.get("crs") == "urn:ogc:def:crs:EPSG::4326"
    w, s, e, n = corners(layers["WGS1984Quad"].find("ows:WGS84BoundingBox", NS))
    assert corners(box) == pytest.approx((s, w, n, e), abs=1e-7)
    # UTM 32N: easting first
    box = layers["UTM32WGS84Quad"].find("ows:BoundingBox", NS)
    assert box.get("crs") == "urn:ogc:def:crs:EPSG::32632"
    to_utm = Transformer.from_crs("EPSG:32631", "EPSG:32632", always_xy=True)
    assert corners(box) == pytest.approx(to_utm.transform_bounds(*native, densify_pts=21), abs=0.01)
    # UTM 31N is the item's own CRS: its raster extent exactly
    box = layers["UTM31WGS84Quad"].find("ows:BoundingBox", NS)
    assert corners(box) == pytest.approx(native, abs=1e-6)
    # the WGS84 box comes first, as the WMTS schema orders a Layer's children
    children = [c.tag.split("}")[1] for c in layers["LAMB93"]]
    assert children[:4] == ["Title", "WGS84BoundingBox", "Identifier", "BoundingBox"]


def test_collection_wmts_lamb93_bounding_box_covers_every_scene(client, sample):
    r = client.get(f"/collections/{C}/WMTSCapabilities.xml", params={"assets": "ms"})
    assert r.status_code == 200, r.text
    box = layers_by_tms(r.text)["LAMB93"].find("ows:BoundingBox", NS)
    assert box.get("crs") == "urn:ogc:def:crs:EPSG::2154"
    got = corners(box)
    to_l93 = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True)
    for item in sample.items:
        ring = np.array(item["geometry"]["coordinates"][0])
        fx, fy = to_l93.transform(ring[:, 0], ring[:, 1])
        assert got[0] <= fx.min() and fx.max() <= got[2] and got[1] <= fy.min() and fy.max() <= got[3]
    assert math.isfinite(sum(got))
