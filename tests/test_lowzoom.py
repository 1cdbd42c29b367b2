"""Low-zoom tiles: `SigningReader.tile` warps only the part of the tile the scene covers.

rio-tiler warps the whole tile extent at the scene's native resolution and then
decimates with nearest: each output pixel gets the value of *a* source pixel lying
within half a warp-grid pixel of its centre, which one depending on where that grid
falls. The low-zoom path warps a smaller grid (the footprint's sub-window), so its
pick can differ from rio-tiler's by one source pixel — both are nearest samples of the
same place. The tests therefore compare each output pixel to the source independently
(the overview GDAL reads, sampled around the pixel centre), compare the masks with
rio-tiler's (equal but for the footprint's edge), and prove the small grid is used.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import rasterio
import rio_tiler.reader
from morecantile import Tile
from pyproj import Transformer
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader
from rio_tiler.utils import get_vrt_transform

from tests.helpers import (
    expected_nearest,
    lonlat_of_item_centre,
    mercator_tile,
    mercator_tile_centres,
    read_tif,
)
from tiler.upstream import SigningReader

C = "spot67-demo"


@pytest.fixture()
def warps(monkeypatch):
    """Sizes (width, height) of the warp grids rio-tiler builds (a spy: the call is unchanged)."""
    seen: list[tuple[int, int]] = []
    real = rio_tiler.reader.get_vrt_transform

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((out[1], out[2]))
        return out

    monkeypatch.setattr(rio_tiler.reader, "get_vrt_transform", spy)
    return seen


def full_tile_warp(path, x: int, y: int, z: int) -> int:
    """Pixels of the warp grid rio-tiler builds for the whole tile (computed, not read)."""
    with Reader(str(path)) as r:
        bounds = r.tms.xy_bounds(Tile(x, y, z))
        _, w, h = get_vrt_transform(r.dataset, bounds, 256, 256, dst_crs=r.tms.rasterio_crs)
    return w * h


def edge(valid: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other validity (the mask's boundary, both sides)."""
    p = np.pad(valid, 1, mode="edge")
    out = np.zeros_like(valid)
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        out |= p[1 + dr : 1 + dr + valid.shape[0], 1 + dc : 1 + dc + valid.shape[1]] != valid
    return out


def check_against_source(path, img) -> float:
    """Every valid pixel of ``img`` is the overview GDAL reads, sampled near the pixel centre.

    The output pixel centre is taken to the scene's CRS with pyproj; the value must be
    one of the overview pixels within half an overview pixel (+5 %) of that point (the
    warp samples at the centre of its own grid's pixel, at most that far away).
    Returns the share of pixels equal to the pixel right under the centre.
    """
    a = img.array
    valid = ~np.ma.getmaskarray(a)[0]
    rows, cols = np.nonzero(valid)
    assert len(rows) > 50, "the tile must show the scene"
    left, bottom, right, top = img.bounds
    res_x, res_y = (right - left) / img.width, (top - bottom) / img.height
    xs, ys = left + (cols + 0.5) * res_x, top - (rows + 0.5) * res_y
    with rasterio.open(path) as src:
        # the overview GDAL picks: the coarsest whose decimation does not exceed the read's
        to_src = Transformer.from_crs(img.crs, src.crs, always_xy=True)
        (x0, x1), (y0, y1) = to_src.transform([xs[0], xs[0] + res_x], [ys[0], ys[0]])
        decimation = math.hypot(x1 - x0, y1 - y0) / src.res[0]
        factors = [f for f in src.overviews(1) if f <= decimation]
        level = src.overviews(1).index(max(factors)) if factors else None
    with rasterio.open(path, **({"overview_level": level} if level is not None else {})) as ovr:
        data, t = ovr.read(), ovr.transform
        sx, sy = Transformer.from_crs(img.crs, ovr.crs, always_xy=True).transform(xs, ys)
    fc, fr = (np.asarray(sx) - t.c) / t.a, (np.asarray(sy) - t.f) / t.e
    got = a.data[:, rows, cols]
    allowed = np.zeros(len(rows), dtype=bool)
    for dr in (-0.55, 0.0, 0.55):
        for dc in (-0.55, 0.0, 0.55):
            r = np.clip(np.floor(fr + dr).astype(int), 0, data.shape[1] - 1)
            c = np.clip(np.floor(fc + dc).astype(int), 0, data.shape[2] - 1)
            allowed |= np.all(data[:, r, c] == got, axis=0)
    assert allowed.all(), f"{(~allowed).sum()} of {len(rows)} pixels are not the source near their centre"
    r0 = np.clip(np.floor(fr).astype(int), 0, data.shape[1] - 1)
    c0 = np.clip(np.floor(fc).astype(int), 0, data.shape[2] - 1)
    return float(np.all(data[:, r0, c0] == got, axis=0).mean())


def compare(path, x, y, z, **kw):
    """The low-zoom tile and rio-tiler's; masks equal but on the footprint edge, both true to the source."""
    with Reader(str(path)) as r:
        plain = r.tile(x, y, z, **kw)
    with SigningReader(str(path), budget=None) as s:
        fast = s.tile(x, y, z, **kw)
    assert fast.array.shape == plain.array.shape and fast.array.dtype == plain.array.dtype
    assert fast.bounds == pytest.approx(plain.bounds) and fast.crs == plain.crs
    assert fast.band_names == plain.band_names and fast.dataset_statistics == plain.dataset_statistics
    assert fast.nodata == plain.nodata and fast.assets == plain.assets
    pv, fv = ~np.ma.getmaskarray(plain.array)[0], ~np.ma.getmaskarray(fast.array)[0]
    differ = pv != fv
    assert not (differ & ~edge(pv)).any(), "masks differ away from the footprint's edge"
    assert differ.sum() <= 0.05 * edge(pv).sum() + 2
    both = pv & fv
    same = np.all(plain.array.data[:, both] == fast.array.data[:, both], axis=0).mean()
    exact_fast = check_against_source(path, fast)
    exact_plain = check_against_source(path, plain)  # the criterion holds for rio-tiler too
    # as often right under the centre as rio-tiler (about 60 % here; the rest a neighbour)
    assert exact_fast > 0.4 and exact_fast > exact_plain - 0.1
    return fast, plain, same


def scene_tile(sample, z: int) -> tuple[int, int]:
    return mercator_tile(*lonlat_of_item_centre(sample.item(0)), z)


@pytest.mark.parametrize("z", [11, 12])
def test_low_zoom_tile_is_the_source_like_rio_tiler(sample, z, warps):
    path = sample.path(0, "pan")
    x, y = scene_tile(sample, z)
    _, _, same = compare(path, x, y, z)
    w, h = warps[-1]  # compare reads with rio-tiler first, then with SigningReader
    assert w * h * 4 < full_tile_warp(path, x, y, z)
    assert same > 0.3  # same sample where both grids fall alike (no stronger claim: see the module doc)


def test_low_zoom_path_warps_only_the_footprint(sample, warps):
    """Structural: the warp grid is the footprint's, not the tile's (fails with the path disabled)."""
    path = sample.path(0, "pan")
    z = 9
    x, y = scene_tile(sample, z)
    with SigningReader(str(path), budget=None) as s:
        t = time.perf_counter()
        img = s.tile(x, y, z)
        fast_s = time.perf_counter() - t
    assert img.array.shape == (1, 256, 256) and (~img.array.mask).sum() > 0
    largest = max(w * h for w, h in warps)
    whole = full_tile_warp(path, x, y, z)
    assert largest * 100 < whole, (largest, whole)  # 1.5 km of a 78 km tile: < 1 % of its grid
    assert fast_s < 5


def test_buffer_keeps_the_grid(sample, warps):
    path = sample.path(0, "pan")
    x, y = scene_tile(sample, 12)
    for buffer in (1, 0.5):
        fast, plain, _ = compare(path, x, y, 12, buffer=buffer)
        assert fast.width == fast.height == 256 + int(2 * buffer)
        w, h = warps[-1]  # compare reads with rio-tiler first, then with SigningReader
        assert w * h * 4 < full_tile_warp(path, x, y, 12)


def test_tile_partly_covered_at_mid_zoom(sample, warps):
    """z14 tile on the scene's NW corner: little of it is covered, the sub-window is read."""
    path = sample.path(0, "pan")
    with rasterio.open(path) as src:
        west, north = src.bounds.left + 150, src.bounds.top - 150
        lon, lat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(west, north)
    x, y = mercator_tile(lon, lat, 14)
    warps.clear()
    fast, _, _ = compare(path, x, y, 14)
    valid = (~np.ma.getmaskarray(fast.array)[0]).mean()
    assert 0 < valid < 0.25
    w, h = warps[-1]  # compare reads with rio-tiler first, then with SigningReader
    assert w * h * 2 < full_tile_warp(path, x, y, 14)


def test_tile_inside_the_scene_takes_the_normal_path(sample, warps):
    path = sample.path(0, "pan")
    x, y = scene_tile(sample, 16)
    with Reader(str(path)) as r:
        plain = r.tile(x, y, 16)
    with SigningReader(str(path), budget=None) as s:
        warps.clear()
        got = s.tile(x, y, 16)
    assert warps[0][0] * warps[0][1] == full_tile_warp(path, x, y, 16)
    assert np.array_equal(got.array.data, plain.array.data)
    assert np.array_equal(got.array.mask, plain.array.mask)
    with SigningReader(str(path), budget=None) as s, pytest.raises(TileOutsideBounds):
        s.tile(0, 0, 8)


def test_low_zoom_mosaic_tile_through_the_app(client, sample, warps):
    """All 3 scenes in one low-zoom tile: 200, each scene's warp is its footprint's, pixels where scenes are."""
    centres = [lonlat_of_item_centre(it) for it in sample.items]
    z = next(z for z in range(9, 5, -1) if len({mercator_tile(*c, z) for c in centres}) == 1)
    x, y = mercator_tile(*centres[0], z)
    warps.clear()
    t = time.perf_counter()
    r = client.get(f"/collections/{C}/tiles/WebMercatorQuad/{z}/{x}/{y}.tif", params={"assets": "ms"})
    took = time.perf_counter() - t
    assert r.status_code == 200, r.text
    data, valid = read_tif(r.content)
    # where each scene is: its valid source pixels under the tile's pixel centres (pyproj + numpy)
    expected = np.zeros(valid.shape, dtype=bool)
    for i in range(len(sample.items)):
        expected |= expected_nearest(sample.path(i, "ms"), *mercator_tile_centres(x, y, z))[1]
    assert valid.sum() >= 3 and expected.sum() >= 3
    assert not (valid & ~expected & ~edge(expected)).any(), "pixels outside every scene"
    assert not (expected & ~valid & ~edge(expected)).any(), "a scene's pixels are missing"
    whole = full_tile_warp(sample.path(0, "ms"), x, y, z)
    assert len(warps) >= 3 and all(w * h * 100 < whole for w, h in warps), (warps, whole)
    assert took < 5  # rio-tiler's whole-tile warps of the 3 scenes take ~6 s here, ours ~0.1 s
