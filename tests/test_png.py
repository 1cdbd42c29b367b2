"""tiler.png: PNG tiles from numpy and libdeflate, decoded pixels equal to GDAL's PNG driver's."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rasterio.io import MemoryFile
from rio_tiler.errors import InvalidFormat
from rio_tiler.io import Reader

from tiler import png

gdal_render = png._rio_tiler_render


@pytest.fixture(autouse=True)
def encoder_on():
    """The encoder on for every test here; the session's setting back afterwards."""
    before = png._enabled
    png.configure(True)
    yield
    png.configure(before)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of each chunk, checking the signature, lengths and CRCs independently."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        i += 12 + n
    assert i == len(data)
    return out


def decode_gdal(data: bytes) -> np.ndarray:
    """(bands, h, w) through GDAL's PNG driver (libpng), a decoder independent of the encoder."""
    with MemoryFile(data) as mem, mem.open() as ds:
        assert ds.driver == "PNG"
        return ds.read()


def textured(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Smooth gradients, flat areas, noise and a hard edge: every filter wins somewhere."""
    top = np.iinfo(dtype).max
    count, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 7 + yy * 3) % (top + 1)
    noise = rng.integers(0, top + 1, size=shape)
    out = np.empty(shape, dtype)
    for b in range(count):
        band = np.where((yy // 5 + b) % 3 == 0, base, noise[b])
        band[: h // 4] = top // 3  # flat rows
        band[:, w // 2 :] = np.where(band[:, w // 2 :] > top // 2, top, 0)  # hard edges
        band[h // 3] = 0  # a row best left unfiltered (None)
        for y in range(6, h, 7):  # rows that are the running mean of left and up (Average, in bytes)
            for x in range(w):
                band[y, x] = ((band[y, x - 1] if x else 0) + band[y - 1, x]) // 2
        out[b] = band
    return out


SHAPES = [(256, 256), (1, 1), (1, 7), (9, 1), (33, 517)]


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("bands", [1, 2, 3])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_decodes_to_the_bands_and_the_mask(dtype, bands, with_mask, shape):
    rng = np.random.default_rng(bands * 100 + shape[1])
    data = textured(rng, (bands, *shape), dtype)
    mask = np.where(rng.random(shape) < 0.3, 0, 255).astype("uint8") if with_mask else None
    out = png.render(data, mask, img_format="PNG", zlevel=1)
    expected = data
    if with_mask:  # 0/255 stretched to the full 16-bit range: 255 * 257 = 65535
        alpha = mask.astype(dtype) * (257 if dtype == "uint16" else 1)
        expected = np.concatenate([data, alpha[np.newaxis]])
    got = decode_gdal(out)
    assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    kinds = [k for k, _ in chunks(out)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color = struct.unpack(">IIBB", chunks(out)[0][1][:10])
    assert (width, height, depth) == (shape[1], shape[0], 8 * np.dtype(dtype).itemsize)
    assert color == {1: 0, 2: 4, 3: 2, 4: 6}[expected.shape[0]]
    # and what GDAL's driver writes for the same call decodes to the same pixels
    np.testing.assert_array_equal(decode_gdal(gdal_render(data, mask, img_format="PNG", zlevel=1)), got)


def test_pillow_reads_rgba_tiles():
    rng = np.random.default_rng(3)
    data = textured(rng, (3, 256, 256), "uint8")
    mask = np.full((256, 256), 255, "uint8")
    mask[:, :40] = 0
    img = Image.open(io.BytesIO(png.render(data, mask, img_format="PNG")))
    assert img.mode == "RGBA"
    got = np.asarray(img)
    np.testing.assert_array_equal(got[..., :3], data.transpose(1, 2, 0))
    np.testing.assert_array_equal(got[..., 3], mask)


def naive_filters(rows: np.ndarray, bpp: int) -> list[int]:
    """libpng's choice per row, written out byte by byte (png_write_find_filter, PNG spec 9.2-9.4)."""
    h, w = rows.shape
    r = rows.astype(int)
    chosen = []
    for y in range(h):
        prev = r[y - 1] if y else np.zeros(w, int)
        costs = []
        for kind in range(5):
            total = 0
            for x in range(w):
                a = r[y, x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                if kind == 0:
                    pred = 0
                elif kind == 1:
                    pred = a
                elif kind == 2:
                    pred = b
                elif kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                v = (r[y, x] - pred) % 256
                total += v if v < 128 else 256 - v
            costs.append(total)
        chosen.append(costs.index(min(costs)))
    return chosen


@pytest.mark.parametrize("bpp", [1, 2, 3, 4, 8])
def test_each_row_gets_libpng_s_filter(bpp):
    rng = np.random.default_rng(bpp)
    rows = textured(rng, (1, 40, 12 * bpp), "uint8")[0]
    filtered = png.filter_rows(rows, bpp)
    assert filtered[:, 0].tolist() == naive_filters(rows, bpp)
    assert set(filtered[:, 0].tolist()) == {0, 1, 2, 3, 4}  # the image exercises every filter


def test_paeth_predictor_against_the_spec():
    """Every (left, up) pair for 52 upleft values, against PNG spec 9.4 written with Python ints."""
    a, b = (g.ravel() for g in np.mgrid[0:256, 0:256])
    for c in range(0, 256, 5):
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        want = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        cc = np.full(a.shape, c, np.uint8)
        np.testing.assert_array_equal(png.paeth(a.astype(np.uint8), b.astype(np.uint8), cc), want)


def test_the_five_filters_undo_to_the_rows():
    """Decoded by zlib and an unfiltering written here, not by the encoder's own code."""
    rng = np.random.default_rng(7)
    data = textured(rng, (4, 64, 64), "uint8")
    out = png.encode(data, level=6)
    raw = zlib.decompress(b"".join(body for kind, body in chunks(out) if kind == b"IDAT"))
    stride, bpp = 64 * 4, 4
    lines = np.frombuffer(raw, np.uint8).reshape(64, stride + 1)
    assert set(lines[:, 0].tolist()) == {0, 1, 2, 3, 4}
    prev = [0] * stride
    for y in range(64):
        kind, line, cur = int(lines[y, 0]), lines[y, 1:].astype(int), [0] * stride
        for x in range(stride):
            a = cur[x - bpp] if x >= bpp else 0
            b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = [0, a, b, (a + b) // 2, a if pa <= pb and pa <= pc else (b if pb <= pc else c)][kind]
            cur[x] = (int(line[x]) + pred) % 256
        assert cur == data.transpose(1, 2, 0)[y].reshape(-1).tolist(), y
        prev = cur


def ms_tiles(directory: Path) -> list:
    ms = sorted(directory.glob("*_MS.tif"))[0]
    with Reader(str(ms)) as r:
        imgs = [r.preview(indexes=(3, 2, 1), max_size=256)]
        imgs += [
            r.tile(x, y, z, indexes=(3, 2, 1)) for x, y, z in [_inner_tile(r, zoom) for zoom in (13, 14)]
        ]
    for img in imgs:
        lo, hi = np.percentile(img.data[:, img.mask > 0], [2, 98])
        img.rescale(in_range=((lo, hi),) * 3)
    return imgs


def _inner_tile(reader, zoom):
    """The tile at ``zoom`` under the centre of the reader's footprint."""
    import morecantile

    b = reader.get_geographic_bounds("EPSG:4326")
    t = morecantile.tms.get("WebMercatorQuad").tile((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, zoom)
    return t.x, t.y, t.z


@pytest.mark.parametrize("level", [1, 6])
def test_no_bigger_than_gdal_s_on_imagery(sample, level):
    """Same pixels; libdeflate at a level finds at least zlib's matches (2 % slack)."""
    for img in ms_tiles(sample.directory):
        ours = png.render(img.data, img.mask, img_format="PNG", zlevel=level)
        theirs = gdal_render(img.data, img.mask, img_format="PNG", zlevel=level)
        np.testing.assert_array_equal(decode_gdal(ours), decode_gdal(theirs))
        assert len(ours) <= 1.02 * len(theirs), (len(ours), len(theirs))
        assert chunks(ours)[1][1][1] >> 6 == (0 if level == 1 else 2)  # zlib FLEVEL, as zlib writes it


def outcome(render, *args, **kwargs):
    """The bytes, or the error's type and message."""
    try:
        return render(*args, **kwargs)
    except Exception as e:
        return type(e), str(e)


def test_what_it_does_not_write_goes_to_gdal():
    rng = np.random.default_rng(5)
    data = textured(rng, (3, 32, 32), "uint8")
    mask = np.full((32, 32), 255, "uint8")
    for call in (
        dict(img_format="JPEG"),
        dict(img_format="WEBP"),
        dict(img_format="PNG", colormap={0: (0, 0, 0, 255), 255: (255, 255, 255, 255)}),
        dict(img_format="PNG", nbits=8),  # a creation option we do not implement
        dict(img_format="PNG", zlevel=0),  # out of GDAL's range: GDAL decides
        dict(img_format="PNG", zlevel="fast"),  # not a number: GDAL decides
    ):
        d = data[:1] if "colormap" in call else data
        assert outcome(png.render, d, mask, **call) == outcome(gdal_render, d, mask, **call), call
    masked = np.ma.MaskedArray(data, mask=np.zeros(data.shape, bool))
    assert outcome(png.render, masked, mask, img_format="PNG") == outcome(
        gdal_render, masked, mask, img_format="PNG"
    )
    with pytest.raises(InvalidFormat):  # 5 bands: GDAL's error, as before
        png.render(np.zeros((4, 8, 8), "uint8"), mask[:8, :8], img_format="PNG")
    with pytest.raises(InvalidFormat):  # float: GDAL's error, as before
        png.render(np.zeros((3, 8, 8), "float32"), img_format="PNG")
    png.configure(False)
    assert png.render(data, mask, img_format="PNG") == gdal_render(data, mask, img_format="PNG")


def test_tiles_come_from_the_setting(client, dsn, sample):
    import rio_tiler.models
    import titiler.core.utils
    from fastapi.testclient import TestClient

    from tests.conftest import make_settings
    from tiler.main import create_app
    from tiler.settings import ReaderSettings

    item = sample.item(0)
    ms = sample.directory / Path(item["assets"]["ms"]["href"].split("?")[0]).name
    with Reader(str(ms)) as r:
        x, y, z = _inner_tile(r, 14)
    url = f"/collections/{item['collection']}/items/{item['id']}/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
    q = {"assets": "ms|bidx=3,2,1", "rescale": "0,1999"}
    assert titiler.core.utils.render is png.render and rio_tiler.models.render is png.render
    r = client.get(url, params=q)
    assert r.status_code == 200
    settings = make_settings(dsn)
    settings.reader = ReaderSettings(png_encoder="gdal")
    settings.cache.enabled = False
    try:
        with TestClient(create_app(settings)) as c:
            assert titiler.core.utils.render is png._rio_tiler_render
            rg = c.get(url, params=q)
    finally:
        png.configure(True)
    assert rg.status_code == 200 and rg.content != r.content
    np.testing.assert_array_equal(decode_gdal(r.content), decode_gdal(rg.content))
    assert decode_gdal(r.content)[3].any()  # not an empty tile
