"""Real clients against a real server (uvicorn on 127.0.0.1): GDAL, OWSLib and QGIS.

Each client reads what users would give it (a capabilities URL, an XYZ template) and what it
shows is compared with the source COGs, read here with rasterio and numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from helpers import expected_nearest, lonlat_of_item_centre, mercator_tile, read_png
from PIL import Image
from pyproj import Transformer
from test_presets import C, item_stretch, stretch8

from tiler.tms import supported_tms

SYSTEM_PYTHON = "/usr/bin/python3"


def _has_qgis() -> bool:
    try:
        r = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import qgis.core"],
            env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _correlation(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    return float(np.corrcoef(a[valid].astype(float), b[valid].astype(float))[0, 1])


def _expected_picture(db, sample, i: int, xs: np.ndarray, ys: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    """The natural-colour picture of item ``i`` at map coordinates xs/ys (nearest, item stretch)."""
    exp, valid = expected_nearest(sample.path(i, "ms"), xs, ys, src_crs_of_xy=crs)
    return stretch8(exp[[2, 1, 0]], item_stretch(db, sample, i, "ms", ["red", "green", "blue"])), valid


# --------------------------------------------------------------------------- GDAL


def test_gdal_reads_a_wmts_window_whose_pixels_match_the_source(live_server, db, sample):
    item = sample.item(0)
    caps = f"{live_server}/collections/{C}/items/{item['id']}/WMTSCapabilities.xml"
    layer = f"{item['id']}_WebMercatorQuad_natural"
    with rasterio.Env(GDAL_HTTP_TIMEOUT=20):
        with rasterio.open(f"WMTS:{caps},layer={layer}") as ds:
            # a 300 x 300 window around the scene centre at the layer's finest level
            lon, lat = lonlat_of_item_centre(item)
            cx, cy = Transformer.from_crs("EPSG:4326", ds.crs, always_xy=True).transform(lon, lat)
            row, col = ds.index(cx, cy)
            window = rasterio.windows.Window(col - 150, row - 150, 300, 300)
            got = ds.read(window=window)
            transform = ds.window_transform(window)
    xs = transform.c + (np.arange(300) + 0.5) * transform.a
    ys = transform.f + (np.arange(300) + 0.5) * transform.e
    gx, gy = np.meshgrid(xs, ys)
    exp, exp_valid = _expected_picture(db, sample, 0, gx, gy, "EPSG:3857")
    valid = (got[3] > 0) & exp_valid
    assert valid.mean() > 0.9
    close = (np.abs(got[:3].astype(int) - exp.astype(int)) <= 1).all(axis=0)
    assert close[valid].mean() > 0.97


# --------------------------------------------------------------------------- OWSLib


def test_owslib_parses_the_catalogue_and_fetches_a_tile(live_server, sample):
    from owslib.wmts import WebMapTileService

    wmts = WebMapTileService(f"{live_server}/WMTSCapabilities.xml")
    ids = set(wmts.contents)
    grids = supported_tms.list()
    assert {f"{C}_{g}_{p}" for g in grids for p in ("natural", "ndvi", "pansharpened")} <= ids
    assert set(grids) <= set(wmts.tilematrixsets)
    layer = wmts.contents[f"{C}_WebMercatorQuad_false-color"]
    w, s, e, n = layer.boundingBoxWGS84
    assert all(w - 1e-6 <= it["bbox"][0] and it["bbox"][2] <= e + 1e-6 for it in sample.items)
    lon, lat = lonlat_of_item_centre(sample.item(1))
    z = 15
    x, y = mercator_tile(lon, lat, z)
    limits = layer.tilematrixsetlinks["WebMercatorQuad"].tilematrixlimits[str(z)]
    assert limits.mintilecol <= x <= limits.maxtilecol and limits.mintilerow <= y <= limits.maxtilerow
    tile = wmts.gettile(
        layer=layer.id, tilematrixset="WebMercatorQuad", tilematrix=str(z), row=y, column=x, format="image/png"
    )
    img = read_png(tile.read())
    valid = img[..., 3] > 0
    assert valid.mean() > 0.5 and img[..., 0][valid].std() > 20


# --------------------------------------------------------------------------- QGIS

QGIS_SCRIPT = r"""
import json, sys
from qgis.core import (QgsApplication, QgsCoordinateReferenceSystem, QgsMapRendererParallelJob,
                       QgsMapSettings, QgsRasterLayer, QgsRectangle)
from qgis.PyQt.QtCore import QSize

args = json.loads(sys.argv[1])
app = QgsApplication([], False)
app.initQgis()
out = {}
for name, uri in args["layers"].items():
    layer = QgsRasterLayer(uri, name, "wms")
    if not layer.isValid():
        out[name] = {"valid": False, "error": layer.error().summary()}
        continue
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    settings.setExtent(QgsRectangle(*args["extent"]))
    settings.setOutputSize(QSize(args["size"], args["size"]))
    settings.setBackgroundColor(__import__("qgis.PyQt.QtGui", fromlist=["QColor"]).QColor(0, 0, 0, 0))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    path = args["out"] + "/" + name + ".png"
    job.renderedImage().save(path)
    out[name] = {"valid": True, "path": path, "errors": [e.message for e in job.errors()]}
print(json.dumps(out))
app.exitQgis()
"""


@pytest.mark.skipif(
    not _has_qgis() and os.environ.get("CI") != "true",  # in CI, a missing QGIS fails the test
    reason="QGIS (Debian python3-qgis, qgis-providers) is not installed; `make test` installs it",
)
def test_qgis_renders_the_xyz_and_wmts_layers(live_server, db, sample, tmp_path):
    item = sample.item(0)
    lon, lat = lonlat_of_item_centre(item)
    cx, cy = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(lon, lat)
    half, size = 400.0, 400  # an 800 m square at 2 m per pixel, inside the scene
    extent = [cx - half, cy - half, cx + half, cy + half]
    xyz = f"{live_server}/collections/{C}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png?preset=natural"
    from urllib.parse import quote

    caps = f"{live_server}/WMTSCapabilities.xml"
    layers = {
        "xyz": f"type=xyz&url={quote(xyz, safe='')}&zmin=0&zmax=16",
        "wmts": (
            "contextualWMSLegend=0&crs=EPSG:3857&dpiMode=7&format=image/png"
            f"&layers={C}_WebMercatorQuad_natural&styles={C}_WebMercatorQuad_natural"
            f"&tileMatrixSet=WebMercatorQuad&url={caps}"
        ),
    }
    profile = Path(tempfile.mkdtemp(prefix="qgis-profile-"))  # fresh profile: no tile disk cache
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(profile),
        "XDG_RUNTIME_DIR": str(profile),
    }
    env.pop("PYTHONPATH", None)
    args = {"layers": layers, "extent": extent, "size": size, "out": str(tmp_path)}
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", QGIS_SCRIPT, json.dumps(args)], env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # pixel centres of the rendered map, and what the source says is there
    res = 2 * half / size
    gx, gy = np.meshgrid(extent[0] + (np.arange(size) + 0.5) * res, extent[3] - (np.arange(size) + 0.5) * res)
    exp, exp_valid = _expected_picture(db, sample, 0, gx, gy, "EPSG:3857")
    for name in ("xyz", "wmts"):
        assert result[name]["valid"], result[name]
        img = np.asarray(Image.open(result[name]["path"]).convert("RGBA"))
        valid = (img[..., 3] > 0) & exp_valid
        assert valid.mean() > 0.8, (name, valid.mean())  # not an empty map
        # the expected place: QGIS resamples the tiles, so compare structure, not exact values
        for band in range(3):
            assert _correlation(img[..., band], exp[band], valid) > 0.8, (name, band)


def test_break_the_capabilities_and_gdal_fails(live_server, sample, monkeypatch):
    """The GDAL test above can fail: with tile URLs pointing nowhere, GDAL reads nothing."""
    item = sample.item(0)
    caps_url = f"{live_server}/collections/{C}/items/{item['id']}/WMTSCapabilities.xml"
    import urllib.request

    xml = urllib.request.urlopen(caps_url).read().decode()
    broken = xml.replace("/tiles/WebMercatorQuad/", "/tiles/NoSuchGrid/")
    path = Path(tempfile.mkdtemp()) / "caps.xml"
    path.write_text(broken)
    layer = f"{item['id']}_WebMercatorQuad_natural"
    with rasterio.Env(GDAL_HTTP_TIMEOUT=20, GDAL_WMTS_ZERO_BLOCK_ON_SERVER_EXCEPTION="NO"):
        with rasterio.open(f"WMTS:{path},layer={layer}") as ds:
            with pytest.raises(rasterio.errors.RasterioIOError):
                ds.read(window=rasterio.windows.Window(0, 0, 256, 256), out_shape=(4, 64, 64))


def test_ogc_api_tiles_tilesets_still_work(client, sample):
    from urllib.parse import unquote

    conf = client.get("/conformance").json()["conformsTo"]
    assert any("ogcapi-tiles-1" in c for c in conf)
    item = f"/collections/{C}/items/{sample.item(0)['id']}"
    for base in (item, f"/collections/{C}"):
        sets = client.get(f"{base}/tiles").json()["tilesets"]
        assert {s["crs"].rsplit("/", 1)[-1] for s in sets} >= {"2154", "3857"}
        ts = client.get(f"{base}/tiles/LAMB93")
        assert ts.status_code == 200, ts.text
        body = ts.json()
        assert body["crs"].endswith("/2154") and body["tileMatrixSetLimits"]
        template = unquote(next(link["href"] for link in body["links"] if link["rel"] == "tile"))
        lim = body["tileMatrixSetLimits"][-1]
        href = (
            template.replace("{z}", lim["tileMatrix"])
            .replace("{y}", str((lim["minTileRow"] + lim["maxTileRow"]) // 2))
            .replace("{x}", str((lim["minTileCol"] + lim["maxTileCol"]) // 2))
        )
        r = client.get(href.replace("http://testserver", "") + ".png")
        assert r.status_code == 200, (href, r.text)
        assert read_png(r.content)[..., -1].mean() > 0  # a default-preset picture
