"""`tiler.overviewread`: the same tiles as rio-tiler's own read, every field, over many grids.

The oracle is rio-tiler's ``read`` through GDAL's implicit overviews (what stock titiler does),
on COGs written here: sizes that do not divide evenly, nodata, an internal mask, an alpha
band, float data, several source CRSs, and every zoom from the file's lowest to past its
resolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from morecantile import tms as tms_registry
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from rio_tiler.io import Reader

from tiler import overviewread

WEB = tms_registry.get("WebMercatorQuad")


def write_cog(path, data, crs, transform, nodata=None, mask=None, descriptions=None, tags=None, levels=None):
    bands, height, width = data.shape
    grid = {"crs": crs, "transform": transform, "nodata": nodata}
    with MemoryFile() as mem:
        with mem.open(
            driver="GTiff", dtype=data.dtype.name, count=bands, height=height, width=width, **grid
        ) as tmp:
            tmp.write(data)
            if mask is not None:
                tmp.write_mask(mask)
            for i, d in enumerate(descriptions or [], start=1):
                tmp.set_band_description(i, d)
            for i, t in (tags or {}).items():
                tmp.update_tags(i, **t)
            tmp.scales = [1.0] * data.shape[0]
        with mem.open() as src:
            opts = {"OVERVIEW_COUNT": levels} if levels else {}
            rio_copy(src, str(path), driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", **opts)


def scene(shape, dtype="uint16", seed=0):
    rng = np.random.default_rng(seed)
    bands, h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    base = (np.sin(x / 37.0) + np.cos(y / 23.0) + 2) * 1000
    data = np.stack([base * (b + 1) + rng.integers(0, 50, (h, w)) for b in range(bands)])
    return data.astype(dtype)


@pytest.fixture(scope="module")
def cogs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ovr")
    out = {}
    # UTM 31N, 4 bands, nodata 0 in a rotated-footprint-like corner, described bands with statistics
    data = scene((4, 3001, 2777))
    data[:, :400, :300] = 0
    tags = {i: {"STATISTICS_MINIMUM": "1", "STATISTICS_MAXIMUM": str(9000 + i)} for i in range(1, 5)}
    write_cog(
        d / "ms.tif",
        data,
        "EPSG:32631",
        Affine(6.0, 0, 560000, 0, -6.0, 4830000),
        nodata=0,
        descriptions=["B0", "B1", "B2", "B3"],
        tags=tags,
    )
    out["ms"] = d / "ms.tif"
    # pan-like: 1 band, 1.5 m, 4 overview levels, nodata
    write_cog(
        d / "pan.tif",
        scene((1, 4096, 4096), seed=1),
        "EPSG:32631",
        Affine(1.5, 0, 570000, 0, -1.5, 4820000),
        nodata=0,
        descriptions=["P"],
    )
    out["pan"] = d / "pan.tif"
    # no nodata, an internal mask (rio-tiler adds an alpha band to its VRT)
    data = scene((3, 1500, 2100), dtype="uint8", seed=2)
    mask = np.full((1500, 2100), 255, dtype="uint8")
    mask[1000:, 1500:] = 0
    write_cog(d / "mask.tif", data, "EPSG:2154", Affine(5.0, 0, 650000, 0, -5.0, 6860000), mask=mask)
    out["mask"] = d / "mask.tif"
    # RGBA with an alpha band
    data = scene((4, 1200, 1200), dtype="uint8", seed=3)
    data[3] = 255
    data[3, :200] = 0
    with MemoryFile() as mem:
        prof = {
            "driver": "GTiff",
            "dtype": "uint8",
            "count": 4,
            "height": 1200,
            "width": 1200,
            "crs": "EPSG:32632",
            "transform": Affine(10.0, 0, 300000, 0, -10.0, 5000000),
            "photometric": "RGB",
            "alpha": "YES",
        }
        with mem.open(**prof) as tmp:
            tmp.write(data)
        with mem.open() as src:
            rio_copy(src, str(d / "rgba.tif"), driver="COG", BLOCKSIZE=256)
    out["rgba"] = d / "rgba.tif"
    # float32 with a NaN nodata, lon/lat
    data = scene((1, 1800, 2400), dtype="float32", seed=4)
    data[0, :50] = np.nan
    write_cog(
        d / "float.tif", data, "EPSG:4326", Affine(0.0001, 0, 2.0, 0, -0.0001, 46.0), nodata=float("nan")
    )
    out["float"] = d / "float.tif"
    return out


def same(a, b) -> list[str]:
    diffs = []
    if not np.array_equal(a.array.data, b.array.data, equal_nan=a.array.dtype.kind == "f"):
        diffs.append("data")
    if not np.array_equal(np.ma.getmaskarray(a.array), np.ma.getmaskarray(b.array)):
        diffs.append("mask")
    for f in (
        "bounds",
        "crs",
        "band_names",
        "band_descriptions",
        "dataset_statistics",
        "metadata",
        "scales",
        "offsets",
        "nodata",
    ):
        if getattr(a, f) != getattr(b, f) and not (
            f == "nodata" and a.nodata != a.nodata and b.nodata != b.nodata
        ):
            diffs.append(f)
    if (a.alpha_mask is None) != (b.alpha_mask is None) or (
        a.alpha_mask is not None and not np.array_equal(a.alpha_mask, b.alpha_mask)
    ):
        diffs.append("alpha_mask")
    return diffs


def tiles_of(path, zooms, per_zoom):
    with rasterio.open(path) as src:
        from rasterio.warp import transform_bounds

        bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
    out = []
    for z in zooms:
        ts = list(WEB.tiles(*bounds, zooms=[z]))
        step = max(1, len(ts) // per_zoom)
        out += ts[::step][:per_zoom]
    return out


def compare(path, tiles, **options):
    """(tiles compared, differences) between rio-tiler's read and ours, same Reader and tiles."""
    diffs = []
    n = 0
    with Reader(str(path)) as r:
        for t in tiles:
            if not r.tile_exists(t.x, t.y, t.z):
                continue
            overviewread.uninstall()
            want = r.tile(t.x, t.y, t.z, **options)
            overviewread.install()
            try:
                got = r.tile(t.x, t.y, t.z, **options)
            finally:
                overviewread.uninstall()
            n += 1
            d = same(want, got)
            if d:
                diffs.append((t, d))
    return n, diffs


@pytest.mark.parametrize(
    "name, zooms, options",
    [
        ("ms", range(9, 16), {}),
        ("ms", range(11, 15), {"indexes": (3, 2, 1)}),
        ("ms", range(11, 15), {"reproject_method": "bilinear"}),
        ("pan", range(9, 18), {}),
        ("pan", [14, 15], {"tilesize": 512}),
        ("mask", range(8, 15), {}),
        ("rgba", range(7, 14), {}),
        ("float", range(10, 16), {}),
    ],
)
def test_tiles_equal_rio_tilers(cogs, name, zooms, options):
    before = overviewread.stats()
    n, diffs = compare(cogs[name], tiles_of(cogs[name], zooms, 14), **options)
    after = overviewread.stats()
    assert n >= 20
    assert not diffs, diffs[:5]
    # the direct path was taken (not rio-tiler's read each time), from an overview and from full resolution
    assert after["direct"] - before["direct"] >= n // 3


def test_levels_are_chosen_as_gdal_does(cogs):
    """GDAL's choice shows in its debug log ("Selecting overview W x H"): ours reads a level of that size."""
    import logging

    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab()
    log = logging.getLogger("rasterio._err")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.DEBUG)
    try:
        chosen = {}
        with rasterio.Env(CPL_DEBUG="ON"), Reader(str(cogs["pan"])) as r:
            for t in tiles_of(cogs["pan"], range(10, 17), 4):
                if not r.tile_exists(t.x, t.y, t.z):
                    continue
                records.clear()
                overviewread.uninstall()
                r.tile(t.x, t.y, t.z)
                gdal = [m.split("Selecting overview ")[1] for m in records if "Selecting overview" in m]
                vrt = {}
                orig = overviewread._plan

                def spy(orig=orig, vrt=vrt, **kw):
                    p = orig(**kw)
                    vrt["plan"] = p
                    return p

                overviewread._plan = spy
                overviewread.install()
                try:
                    r.tile(t.x, t.y, t.z)
                finally:
                    overviewread._plan = orig
                    overviewread.uninstall()
                plan = vrt["plan"]
                ours = f"{plan[1][0]} x {plan[1][1]}" if plan and plan[1] else None
                chosen[(t.z, t.x, t.y)] = (gdal[0] if gdal else None, ours)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    assert chosen
    assert all(g == o for g, o in chosen.values()), chosen
    assert any(o for _, o in chosen.values()) and any(o is None for _, o in chosen.values())


def test_other_cases_are_rio_tilers_read(cogs):
    before = overviewread.stats()
    overviewread.install()
    try:
        with Reader(str(cogs["pan"])) as r:
            t = tiles_of(cogs["pan"], [13], 1)[0]
            r.tile(t.x, t.y, t.z, resampling_method="bilinear")  # not nearest: GDAL's own choice
            r.preview(max_size=256)  # no reprojection
            with rasterio.Env(GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD="2"):
                r.tile(t.x, t.y, t.z)
    finally:
        overviewread.uninstall()
    after = overviewread.stats()
    assert after["direct"] == before["direct"]
    assert after["rio_tiler"] - before["rio_tiler"] >= 3


def test_levels_close_with_their_dataset_and_few_stay_open(cogs):
    overviewread.install()
    try:
        src = rasterio.open(cogs["pan"])
        r = Reader(str(cogs["pan"]), dataset=src)
        for z in range(9, 17):  # every level of the file, and its full resolution
            t = tiles_of(cogs["pan"], [z], 1)[0]
            r.tile(t.x, t.y, t.z)
        levels = overviewread._derived[src]["levels"]
        assert len(overviewread._derived[src]["sizes"]) == 4
        assert 0 < len(levels) <= overviewread.LEVELS_KEPT  # the others were closed
        kept = list(levels.values())
        assert not any(ds.closed for ds in kept)
        overviewread.close_derived(src)
        assert all(ds.closed for ds in kept)
        src.close()
    finally:
        overviewread.uninstall()
