"""Metacatalogue thumbnails: footprint, aspect, background, overview-only reads, ETag/304."""

from __future__ import annotations

import io

import numpy as np
import pytest
import rasterio
from conftest import RECORDED as T
from helpers import expected_nearest
from PIL import Image
from test_presets import C, item_stretch, stretch8

from tiler.sample import CRS_EPSG, default_scenes


def url(sample, i: int = 0, collection: str = C, fmt: str = "png") -> str:
    return f"/collections/{collection}/items/{sample.item(i)['id']}/thumbnail.{fmt}"


def ring(sample, i: int = 0) -> np.ndarray:
    """The scene's footprint in its own CRS (what the generator drew)."""
    ms = sample.item(i)["assets"]["ms"]
    size = ms["proj:shape"][0]
    scene = next(s for s in default_scenes(3, size) if s.item_id == sample.item(i)["id"])
    return scene.footprint()


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_png_thumbnail_is_the_footprint_with_its_aspect(client, db, sample):
    r = client.get(url(sample), params={"size": 200})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = decode(r.content)
    fp = ring(sample)
    (minx, miny), (maxx, maxy) = fp.min(axis=0), fp.max(axis=0)
    h, w = img.shape[:2]
    assert max(h, w) == 200
    assert w / h == pytest.approx((maxx - minx) / (maxy - miny), abs=0.02)
    alpha = img[..., 3] > 0
    # outside the rotated footprint is transparent: corners empty, valid share = polygon / bbox
    assert not alpha[0, 0] and not alpha[-1, -1] and alpha[h // 2, w // 2]
    x, y = fp[:, 0], fp[:, 1]
    area = 0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    assert alpha.mean() == pytest.approx(area / ((maxx - minx) * (maxy - miny)), abs=0.03)
    # the pixels are the scene's: natural colour, item stretch, sampled at the pixel centres
    xs = minx + (np.arange(w) + 0.5) * (maxx - minx) / w
    ys = maxy - (np.arange(h) + 0.5) * (maxy - miny) / h
    gx, gy = np.meshgrid(xs, ys)
    exp, valid = expected_nearest(sample.path(0, "ms"), gx, gy, src_crs_of_xy=f"EPSG:{CRS_EPSG}")
    exp = stretch8(exp[[2, 1, 0]], item_stretch(db, sample, 0, "ms", ["red", "green", "blue"]))
    both = valid & alpha
    for b in range(3):
        assert np.corrcoef(img[..., b][both].astype(float), exp[b][both].astype(float))[0, 1] > 0.9


@pytest.mark.parametrize("fmt,params", [("jpeg", {}), ("png", {"background": "white"}), ("webp", {"background": "white"})])
def test_white_background(client, sample, fmt, params):
    r = client.get(url(sample, fmt=fmt), params={"size": 128, **params})
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    img = decode(r.content)
    assert img.ndim == 3 and img.shape[2] == 3  # no alpha
    assert (img[0, 0] >= 250).all() and (img[-1, -1] >= 250).all()  # white corners
    assert img[img.shape[0] // 2, img.shape[1] // 2].max() < 250  # imagery in the middle


def test_etag_and_304(client, sample):
    r1 = client.get(url(sample), params={"size": 128})
    etag = r1.headers["etag"]
    assert etag.startswith('"') and r1.headers["cache-control"].startswith("public")
    r2 = client.get(url(sample), params={"size": 128}, headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b"" and r2.headers["etag"] == etag
    for other in ({"size": 129}, {"size": 128, "preset": "ndvi"}, {"size": 128, "background": "white"}):
        assert client.get(url(sample), params=other).headers["etag"] != etag
    assert client.get(url(sample, fmt="webp"), params={"size": 128}).headers["etag"] != etag
    assert client.get(url(sample, 1), params={"size": 128}).headers["etag"] != etag


@pytest.mark.parametrize("params", [{"size": 5000}, {"size": 4}, {"background": "pink"}, {"preset": "nope"}])
def test_bad_thumbnail_parameters_are_4xx(client, sample, params):
    r = client.get(url(sample), params=params)
    assert r.status_code in (400, 422) and "detail" in r.json()


# --------------------------------------------------------------------------- overview-only reads


def _block_ranges(path, overview_level=None) -> list[tuple[int, int]]:
    opts = {} if overview_level is None else {"overview_level": overview_level}
    out = []
    with rasterio.open(path, **opts) as src:
        rows, cols = -(-src.height // src.block_shapes[0][0]), -(-src.width // src.block_shapes[0][1])
        for r in range(rows):
            for c in range(cols):
                off = int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
                size = int(src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))
                out.append((off, off + size - 1))
    return out


def test_thumbnail_reads_an_overview_never_the_full_resolution(client, sample, recorded):
    pan = sample.path(0, "pan")
    full, overview = _block_ranges(pan), _block_ranges(pan, overview_level=0)
    assert len(full) > 1  # the pan has full-resolution blocks to avoid, and an overview
    recorded.ranges.clear()
    r = client.get(url(sample, collection=T), params={"preset": "panchromatic", "size": 256})
    assert r.status_code == 200
    name = "/" + pan.name
    spans = []
    for path, rng in recorded.ranges:
        if path == name and rng:
            lo, hi = (int(v) for v in rng.split("=")[1].split("-"))
            spans.append((lo, hi))
    assert spans, ("the pan COG was read", recorded.ranges, name)

    def covered(block):  # bytes of a block that were downloaded
        b_lo, b_hi = block
        return sum(max(0, min(hi, b_hi) - max(lo, b_lo) + 1) for lo, hi in spans)

    # the overview block is read whole; of the full-resolution blocks, only what GDAL's 16 KiB
    # read granularity drags in past the end of the overview (no full block, <10 % of the bytes)
    assert all(covered(b) == b[1] - b[0] + 1 for b in overview)
    full_bytes = sum(hi - lo + 1 for lo, hi in full)
    assert sum(covered(b) for b in full) < 0.1 * full_bytes, (spans, full)
    assert all(covered(b) < 0.5 * (b[1] - b[0] + 1) for b in full)
    # a 304 reads nothing at all
    etag = r.headers["etag"]
    recorded.ranges.clear()
    r = client.get(
        url(sample, collection=T), params={"preset": "panchromatic", "size": 256}, headers={"If-None-Match": etag}
    )
    assert r.status_code == 304 and recorded.ranges == []


def test_collection_thumbnail_over_its_extent(client, sample):
    from pyproj import Transformer

    r = client.get(f"/collections/{C}/thumbnail.png", params={"size": 300})
    assert r.status_code == 200, r.text
    img = decode(r.content)
    h, w = img.shape[:2]
    assert max(h, w) == 300
    west = min(it["bbox"][0] for it in sample.items)
    east = max(it["bbox"][2] for it in sample.items)
    south = min(it["bbox"][1] for it in sample.items)
    north = max(it["bbox"][3] for it in sample.items)
    xs, ys = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform([west, east], [south, north])
    assert w / h == pytest.approx((xs[1] - xs[0]) / (ys[1] - ys[0]), rel=0.03)
    alpha = img[..., 3] > 0
    assert 0.3 < alpha.mean() < 0.95 and not alpha[0, -1]  # three rotated scenes, empty corners
    assert img[..., 1][alpha].std() > 20
    etag = r.headers["etag"]
    r = client.get(f"/collections/{C}/thumbnail.png", params={"size": 300}, headers={"If-None-Match": etag})
    assert r.status_code == 304
    r = client.get(f"/collections/{C}/thumbnail.jpeg", params={"size": 300, "preset": "ndvi"})
    assert r.status_code == 200 and decode(r.content).shape[2] == 3
