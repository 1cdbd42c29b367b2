"""AOI exports a scientist can use: the scene's own grid, raw values, masks and STAC metadata kept.

``GET /collections/{c}/items/{i}/export.tif?bbox=...`` (and ``POST`` with a GeoJSON feature)
answers a GeoTIFF of one asset of one item over a box:

* **native grid** (``grid=native``, the default): the box (in ``bbox-crs``, EPSG:4326 by
  default) is taken to the asset's CRS and widened outward to whole source pixels; the file
  has the asset's CRS, pixel size and pixel edges, and its pixels are the source's, read
  without resampling (``rasterio`` window reads through `tiler.upstream.SigningReader`, so
  upstream credentials and signers apply). Bands keep their type (uint16 stays uint16).
* **pansharpened** (``asset=pansharpened``): the weighted Brovey product of
  `tiler.pansharpen` on the pan grid: the MS bands upsampled to the pan grid with
  `tiler.pansharpen.upsample` (bilinear between MS pixel centres, border pixels repeated),
  fused with the pan by `tiler.pansharpen.brovey` with the weights of the item's platform
  (the collection's ``pansharpened`` render or the built-in preset). It needs MS and pan
  grids sharing pixel edges with an integer ratio (SPOT 6/7, Pléiades).
* **Lambert-93** (``grid=l93-0.5|l93-1.5|l93-6``): EPSG:2154 with the origin and the pixel
  size on multiples of the step; the only option that resamples (``resampling``, nearest by
  default so values stay raw values).

Masks: where the source has a nodata value, the file has it; where it has a mask instead,
the file has an internal mask. With a GeoJSON feature, pixels outside it (not touched by
it) are masked too. The item's STAC metadata worth keeping (id, collection, datetime,
platform, constellation, instruments, licence...) are GeoTIFF metadata, band names are
band descriptions. The file is written by strips of rows, so memory stays bounded whatever
its size; its size is checked against a cap before anything is read (`ExportTooLarge`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pystac
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError
from rasterio.features import geometry_mask
from rasterio.warp import reproject, transform_bounds, transform_geom
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from tiler import __version__
from tiler.errors import ExportTooLarge, InvalidExportParameters, InvalidPansharpenParameters
from tiler.pansharpen import brovey, sensor_weights, upsample
from tiler.presets import PresetContext, common_name
from tiler.upstream import SigningReader

PANSHARPENED = "pansharpened"
#: ``grid`` values: None is the source's own grid, a number the Lambert-93 step in metres
GRIDS: dict[str, float | None] = {"native": None, "l93-0.5": 0.5, "l93-1.5": 1.5, "l93-6": 6.0}
LAMBERT93 = CRS.from_epsg(2154)
RESAMPLINGS = ("nearest", "bilinear", "cubic", "average")
#: MS upsampling of the pansharpened product (as in `tiler.pansharpen.upsample`)
PANSHARPEN_UPSAMPLING = "bilinear"
#: output pixels per strip written at once (a strip is a multiple of the 512-row blocks)
STRIP_PIXELS = 4 * 1024 * 1024
BLOCK = 512
_EPSG = re.compile(r"^(?:EPSG:|urn:ogc:def:crs:EPSG::|https?://www\.opengis\.net/def/crs/EPSG/0/)(\d{4,6})$")
_CRS84 = {
    "CRS84",
    "OGC:CRS84",
    "http://www.opengis.net/def/crs/OGC/1.3/CRS84",
    "urn:ogc:def:crs:OGC:1.3:CRS84",
}
_EPS = 1e-6


@dataclass(frozen=True)
class ExportRequest:
    """What to export (plain values: it travels in a job's payload)."""

    collection_id: str
    item_id: str
    bbox: tuple[float, float, float, float]
    bbox_crs: str = "EPSG:4326"
    asset: str | None = None
    bands: tuple[str, ...] | None = None
    grid: str = "native"
    resampling: str = "nearest"
    geometry: dict | None = None

    def as_dict(self) -> dict[str, Any]:
        """The request as JSON-friendly values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportRequest:
        """Inverse of `as_dict`."""
        values = dict(data)
        values["bbox"] = tuple(values["bbox"])
        values["bands"] = tuple(values["bands"]) if values.get("bands") else None
        return cls(**values)


def parse_crs(text: str) -> CRS:
    """``EPSG:<code>``, its OGC URI/URN forms, or ``CRS84``: nothing else (no WKT, no PROJ strings)."""
    value = text.strip()
    if value in _CRS84:
        return CRS.from_epsg(4326)
    m = _EPSG.match(value)
    if m is None:
        raise InvalidExportParameters(
            f"`bbox-crs` must be EPSG:<code>, http://www.opengis.net/def/crs/EPSG/0/<code> or CRS84, got {value[:64]!r}"
        )
    try:
        return CRS.from_epsg(int(m.group(1)))
    except CRSError:
        raise InvalidExportParameters(f"`bbox-crs` EPSG:{m.group(1)} is not a known CRS") from None


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``minx,miny,maxx,maxy``: four finite numbers, min < max."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) and abs(v) <= 1e9 for v in values):
        raise InvalidExportParameters("`bbox` must be minx,miny,maxx,maxy (four finite numbers)")
    if not (values[0] < values[2] and values[1] < values[3]):
        raise InvalidExportParameters("`bbox` must have minx < maxx and miny < maxy")
    return (values[0], values[1], values[2], values[3])


def parse_bands(text: str | None) -> tuple[str, ...] | None:
    """``bands=a,b,c`` as a tuple (None when absent or empty)."""
    if not text:
        return None
    names = tuple(b.strip() for b in text.split(",") if b.strip())
    if len(set(names)) != len(names):
        raise InvalidExportParameters("`bands` names a band twice")
    return names or None


# --------------------------------------------------------------------------- sources and products


@dataclass
class Band:
    """One output band: where it comes from and what to call it."""

    index: int  # 1-based, in its asset
    name: str
    tags: dict[str, str] = field(default_factory=dict)


def _asset_bands(asset: pystac.Asset, count: int) -> list[Band]:
    """The bands of an asset: ``eo:bands`` (or STAC 1.1 ``bands``) names, else ``b1..bN``."""
    extra = asset.extra_fields
    meta = extra.get("eo:bands") or extra.get("bands") or []
    out = []
    for i in range(1, count + 1):
        b = meta[i - 1] if i - 1 < len(meta) and isinstance(meta[i - 1], dict) else {}
        tags = {
            k: str(b[k]) for k in ("name", "center_wavelength", "full_width_half_max") if b.get(k) is not None
        }
        if cn := common_name(b):
            tags["common_name"] = cn
        out.append(Band(i, str(b.get("name") or cn or f"b{i}"), tags))
    return out


def select_bands(available: list[Band], wanted: tuple[str, ...] | None) -> list[Band]:
    """The bands named by ``wanted`` (eo name, common name or 1-based number), in that order."""
    if not wanted:
        return list(available)
    out = []
    for w in wanted:
        found = next(
            (
                b
                for b in available
                if w == b.name or w == b.tags.get("common_name") or (w.isdigit() and int(w) == b.index)
            ),
            None,
        ) or next(
            (b for b in available if w.lower() in (b.name.lower(), b.tags.get("common_name", "").lower())),
            None,
        )
        if found is None:
            names = ", ".join(
                f"{b.name} ({b.tags['common_name']})" if "common_name" in b.tags else b.name
                for b in available
            )
            raise InvalidExportParameters(f"`bands`: no band {w!r} here; bands: {names}")
        out.append(found)
    return out


def _check_grid(ds: Any, what: str) -> None:
    t = ds.transform
    if ds.crs is None or t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise InvalidExportParameters(
            f"{what} has no north-up georeferenced grid (CRS and an unrotated transform): it cannot be exported"
        )


@dataclass
class Product:
    """What an export reads: a grid (CRS, transform, valid window) and a reader of its windows."""

    crs: CRS
    transform: Affine
    valid: Window  # the part of the grid with data (pixel coordinates of ``transform``)
    dtype: str
    nodata: float | None
    bands: list[Band]
    read: Callable[[Window], np.ma.MaskedArray]  # window inside ``valid`` -> (bands, h, w)
    scales: list[float] | None = None
    offsets: list[float] | None = None
    processing: str = ""

    @property
    def count(self) -> int:
        """Output bands."""
        return len(self.bands)


def _window_read(reader: SigningReader, indexes: list[int]) -> Callable[[Window], np.ma.MaskedArray]:
    def read(window: Window) -> np.ma.MaskedArray:
        return reader.read(indexes=indexes, window=window).array

    return read


def _tiff_asset(item: pystac.Item, key: str) -> pystac.Asset:
    asset = item.assets.get(key)
    if asset is None:
        raise InvalidExportParameters(
            f"`asset`: item {item.id!r} has no asset {key!r}; assets: {', '.join(sorted(item.assets))}, {PANSHARPENED}"
        )
    media = (asset.media_type or "").lower()
    if media and not media.startswith("image/tiff"):
        raise InvalidExportParameters(f"`asset`: {key!r} is not a GeoTIFF ({media})")
    return asset


def default_asset(item: pystac.Item, layout: dict[str, str]) -> str:
    """The multispectral asset (the one holding ``red``), else the first GeoTIFF data asset."""
    if "red" in layout:
        return layout["red"]
    for key, asset in item.assets.items():
        if "data" in (asset.roles or []) and (asset.media_type or "image/tiff").lower().startswith(
            "image/tiff"
        ):
            return key
    raise InvalidExportParameters(f"item {item.id!r} has no GeoTIFF data asset: name one with `asset`")


def _open(stack: contextlib.ExitStack, item: pystac.Item, key: str) -> tuple[SigningReader, pystac.Asset]:
    asset = _tiff_asset(item, key)
    href = asset.get_absolute_href() or asset.href
    reader = stack.enter_context(SigningReader(href, label=f"{item.id}/{key}"))
    _check_grid(reader.dataset, f"asset {key!r}")
    return reader, asset


def _single(
    stack: contextlib.ExitStack, item: pystac.Item, key: str, wanted: tuple[str, ...] | None
) -> Product:
    reader, asset = _open(stack, item, key)
    ds = reader.dataset
    bands = select_bands(_asset_bands(asset, ds.count), wanted)
    idx = [b.index for b in bands]
    return Product(
        crs=ds.crs,
        transform=ds.transform,
        valid=Window(0, 0, ds.width, ds.height),
        dtype=ds.dtypes[idx[0] - 1],
        nodata=ds.nodata,
        bands=bands,
        read=_window_read(reader, idx),
        scales=[ds.scales[i - 1] for i in idx],
        offsets=[ds.offsets[i - 1] for i in idx],
        processing=f"asset {key}, source values",
    )


def pansharpen_weights(
    ctx: PresetContext | None, platform: str | None, ms_bands: list[Band]
) -> tuple[float, ...]:
    """Weights of the item's MS bands (file order) for its platform.

    From the ``pansharpened`` preset (a collection's render wins over the built-in one),
    else `tiler.pansharpen.sensor_weights`; a band without a weight gets 0.
    """
    by_name: dict[str, float] = {}
    preset = ctx.presets.get(PANSHARPENED) if ctx is not None else None
    if preset is not None and preset.pansharpen is not None:
        spec = preset.resolve(ctx.layout).pansharpen  # type: ignore[union-attr]
        w = spec.weights_for(platform) if spec is not None else None
        if w is not None:
            by_name = dict(zip(spec.ms_bands, w, strict=True))  # type: ignore[union-attr]
    if not by_name:
        w4 = sensor_weights(platform or "")
        by_name = dict(zip(("blue", "green", "red", "nir"), w4, strict=True))
    return tuple(float(by_name.get(b.tags.get("common_name", ""), 0.0)) for b in ms_bands)


def _pansharpened(
    stack: contextlib.ExitStack,
    item: pystac.Item,
    ctx: PresetContext | None,
    wanted: tuple[str, ...] | None,
) -> Product:
    layout = ctx.layout if ctx is not None else {}
    if "pan" not in layout or "red" not in layout:
        raise InvalidExportParameters(f"item {item.id!r} has no pan band and MS bands to pansharpen")
    ms_reader, ms_asset = _open(stack, item, layout["red"])
    pan_reader, pan_asset = _open(stack, item, layout["pan"])
    ms, pan = ms_reader.dataset, pan_reader.dataset
    ms_bands = _asset_bands(ms_asset, ms.count)
    out = select_bands(ms_bands, wanted)
    pan_band = next(b for b in _asset_bands(pan_asset, pan.count) if b.tags.get("common_name") == "pan")
    weights = pansharpen_weights(ctx, item.properties.get("platform"), ms_bands)
    # the grids must share pixel edges, with an integer ratio
    ratio_f = ms.transform.a / pan.transform.a
    ratio = round(ratio_f)
    ox = (pan.transform.c - ms.transform.c) / pan.transform.a
    oy = (ms.transform.f - pan.transform.f) / pan.transform.a
    aligned = (
        ms.crs == pan.crs
        and ratio >= 1
        and abs(ratio_f - ratio) < _EPS
        and abs(-ms.transform.e / -pan.transform.e - ratio) < _EPS
        and abs(ox - round(ox)) < _EPS
        and abs(oy - round(oy)) < _EPS
    )
    if not aligned:
        raise InvalidExportParameters(
            "the pansharpened export needs MS and pan grids sharing pixel edges with an integer resolution ratio"
        )
    ox, oy = round(ox), round(oy)
    # pan pixels covered by both (pan pixel coordinates)
    c0, r0 = max(0, -ox), max(0, -oy)
    c1, r1 = min(pan.width, ms.width * ratio - ox), min(pan.height, ms.height * ratio - oy)
    if c1 <= c0 or r1 <= r0:
        raise InvalidExportParameters("the MS and pan assets do not overlap")
    ms_nodata = ms.nodata if ms.nodata is not None else 0
    pan_idx = pan_band.index

    def read(window: Window) -> np.ma.MaskedArray:
        col, row = int(window.col_off), int(window.row_off)
        w, h = int(window.width), int(window.height)
        # pan pixel coordinates on the MS grid, then the MS pixels bilinear interpolation draws on
        gc, gr = col + ox, row + oy
        m_c0, m_c1 = max(0, gc // ratio - 1), min(ms.width, (gc + w - 1) // ratio + 2)
        m_r0, m_r1 = max(0, gr // ratio - 1), min(ms.height, (gr + h - 1) // ratio + 2)
        ms_arr = ms_reader.read(window=Window(m_c0, m_r0, m_c1 - m_c0, m_r1 - m_r0)).array
        up = upsample(ms_arr, ratio, PANSHARPEN_UPSAMPLING)
        sc, sr = gc - m_c0 * ratio, gr - m_r0 * ratio
        up = up[:, sr : sr + h, sc : sc + w]
        pan_arr = pan_reader.read(indexes=[pan_idx], window=window).array
        fused = brovey(up, pan_arr, weights, dtype=ms.dtypes[0], nodata=ms_nodata)
        return fused[[b.index - 1 for b in out]]

    return Product(
        crs=pan.crs,
        transform=pan.transform,
        valid=Window(c0, r0, c1 - c0, r1 - r0),
        dtype=ms.dtypes[0],
        nodata=ms_nodata,
        bands=out,
        read=read,
        processing=(
            f"pansharpened: weighted Brovey (tiler.pansharpen) of {layout['red']} with {layout['pan']} "
            f"on the pan grid, MS upsampled x{ratio} ({PANSHARPEN_UPSAMPLING}), weights "
            + ",".join(
                f"{b.tags.get('common_name', b.name)}={w:g}" for b, w in zip(ms_bands, weights, strict=True)
            )
        ),
    )


@contextlib.contextmanager
def open_product(
    item: pystac.Item, req: ExportRequest, ctx: PresetContext | None, gdal_options: dict[str, Any]
) -> Iterator[Product]:
    """The product ``req`` asks for, its assets open (through `SigningReader`) until the block ends.

    ``gdal_options`` (`tiler.settings.GdalSettings.env_options`) apply to every read and write of the block.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(**gdal_options))
        if req.asset == PANSHARPENED:
            try:
                yield _pansharpened(stack, item, ctx, req.bands)
            except InvalidPansharpenParameters as e:
                raise InvalidExportParameters(str(e)) from None
        else:
            key = req.asset or default_asset(item, ctx.layout if ctx is not None else {})
            yield _single(stack, item, key, req.bands)


# --------------------------------------------------------------------------- the output grid


@dataclass(frozen=True)
class Grid:
    """The file's grid; ``window`` is its place on the product's grid when it is that grid."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    window: Window | None = None

    @property
    def pixels(self) -> int:
        """Width x height."""
        return self.width * self.height

    @property
    def step(self) -> float:
        """Pixel size."""
        return self.transform.a


def _aoi(req: ExportRequest, crs: CRS) -> tuple[tuple[float, float, float, float], dict | None]:
    """The box (and the feature's geometry, if any) in ``crs``."""
    src = parse_crs(req.bbox_crs)
    try:
        bounds = transform_bounds(src, crs, *req.bbox, densify_pts=21)
        geom = transform_geom(src, crs, req.geometry) if req.geometry is not None else None
    except Exception as e:  # noqa: BLE001 - PROJ refuses coordinates outside the CRS's area
        raise InvalidExportParameters(
            f"`bbox` cannot be taken from {req.bbox_crs} to the export's CRS"
        ) from e
    if not all(math.isfinite(v) for v in bounds):
        raise InvalidExportParameters(f"`bbox` cannot be taken from {req.bbox_crs} to the export's CRS")
    return bounds, geom


def _outward(lo: float, hi: float) -> tuple[int, int]:
    return math.floor(lo + _EPS), math.ceil(hi - _EPS)


def output_grid(product: Product, req: ExportRequest) -> Grid:
    """The file's grid: the box widened to whole pixels of the product (or of the Lambert-93 step)."""
    if req.grid not in GRIDS:
        raise InvalidExportParameters(f"`grid` must be one of {', '.join(GRIDS)}, got {req.grid!r}")
    step = GRIDS[req.grid]
    v = product.valid
    if step is None:
        bounds, _ = _aoi(req, product.crs)
        inv = ~product.transform
        (x0, y0), (x1, y1) = inv @ (bounds[0], bounds[3]), inv @ (bounds[2], bounds[1])
        c0, c1 = _outward(x0, x1)
        r0, r1 = _outward(y0, y1)
        c0, r0 = max(c0, int(v.col_off)), max(r0, int(v.row_off))
        c1, r1 = min(c1, int(v.col_off + v.width)), min(r1, int(v.row_off + v.height))
        if c1 <= c0 or r1 <= r0:
            raise InvalidExportParameters(f"`bbox` does not overlap item {req.item_id!r}")
        window = Window(c0, r0, c1 - c0, r1 - r0)
        return Grid(product.crs, window_transform(window, product.transform), c1 - c0, r1 - r0, window)
    bounds, _ = _aoi(req, LAMBERT93)
    extent = rasterio.windows.bounds(v, product.transform)
    item_l93 = transform_bounds(product.crs, LAMBERT93, *extent, densify_pts=21)
    left, bottom = max(bounds[0], item_l93[0]), max(bounds[1], item_l93[1])
    right, top = min(bounds[2], item_l93[2]), min(bounds[3], item_l93[3])
    if right <= left or top <= bottom:
        raise InvalidExportParameters(f"`bbox` does not overlap item {req.item_id!r}")
    i0, i1 = _outward(left / step, right / step)
    j0, j1 = _outward(bottom / step, top / step)
    return Grid(LAMBERT93, Affine(step, 0, i0 * step, 0, -step, j1 * step), i1 - i0, j1 - j0)


def check_size(grid: Grid, max_size: int, max_pixels: int, what: str, advice: str = "") -> None:
    """Refuse an export whose grid is over ``max_size`` a side or ``max_pixels`` in all (`ExportTooLarge`)."""
    if max(grid.width, grid.height) <= max_size and grid.pixels <= max_pixels:
        return
    raise ExportTooLarge(
        f"The export is {grid.width} x {grid.height} px ({grid.pixels:,} px); {what} is capped at "
        f"{max_size} px a side and {max_pixels:,} px in all, and an export is never downsampled. {advice}".strip()
    )


# --------------------------------------------------------------------------- writing


def _acquired(props: dict[str, Any]) -> str | None:
    value = props.get("datetime") or props.get("start_datetime")
    return str(value) if value else None


def dataset_tags(
    item: pystac.Item, collection: dict | None, req: ExportRequest, product: Product, grid: Grid
) -> dict[str, str]:
    """GeoTIFF metadata: the STAC fields worth keeping, and what was done to the pixels."""
    props = item.properties
    tags: dict[str, str] = {"stac_item": item.id, "stac_collection": req.collection_id}
    for key in (
        "datetime",
        "start_datetime",
        "end_datetime",
        "platform",
        "constellation",
        "gsd",
        "eo:cloud_cover",
        "view:off_nadir",
        "view:sun_elevation",
        "proj:epsg",
    ):
        if props.get(key) is not None:
            tags[key.replace(":", "_")] = str(props[key])  # GDAL drops names with ":"
    if props.get("instruments"):
        tags["instruments"] = ",".join(map(str, props["instruments"]))
    licence = props.get("license") or (collection or {}).get("license")
    if licence:
        tags["license"] = str(licence)
        tags["TIFFTAG_COPYRIGHT"] = str(licence)
    providers = (collection or {}).get("providers") or []
    names = [str(p.get("name")) for p in providers if isinstance(p, dict) and p.get("name")]
    if names:
        tags["providers"] = ", ".join(names)
    processing = product.processing
    if grid.window is None:
        processing += f"; resampled to EPSG:2154 on a {grid.step:g} m grid ({req.resampling})"
    else:
        processing += "; source grid, no resampling"
    tags["dinamis_product"] = req.asset or "default"
    tags["dinamis_processing"] = processing
    if req.geometry is not None:
        tags["dinamis_masked_outside_feature"] = "true"
    if acquired := _acquired(props):
        tags["TIFFTAG_DATETIME"] = _tiff_datetime(acquired)
    tags["TIFFTAG_SOFTWARE"] = f"dinamis-tiler {__version__}"
    tags["TIFFTAG_IMAGEDESCRIPTION"] = f"{req.collection_id}/{item.id} {req.asset or 'default'}"
    return tags


def _tiff_datetime(iso: str) -> str:
    try:
        d = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso[:19]
    return d.astimezone(dt.UTC).strftime("%Y:%m:%d %H:%M:%S")


def _strips(grid: Grid) -> Iterator[tuple[int, int]]:
    rows = max(BLOCK, (STRIP_PIXELS // max(grid.width, 1)) // BLOCK * BLOCK)
    for r in range(0, grid.height, rows):
        yield r, min(rows, grid.height - r)


def _margin(resampling: str) -> int:
    return {"nearest": 1, "bilinear": 2, "average": 2}.get(resampling, 3)


def _warped_strip(
    product: Product, grid: Grid, row: int, h: int, resampling: str, fill: float
) -> np.ma.MaskedArray:
    """Rows ``row..row+h`` of a Lambert-93 grid, reprojected from the product's pixels around them."""
    dst_transform = grid.transform @ Affine.translation(0, row)
    out = np.full((product.count, h, grid.width), fill, dtype=product.dtype)
    strip_bounds = rasterio.transform.array_bounds(h, grid.width, dst_transform)
    src_bounds = transform_bounds(LAMBERT93, product.crs, *strip_bounds, densify_pts=21)
    inv = ~product.transform
    (x0, y0), (x1, y1) = inv @ (src_bounds[0], src_bounds[3]), inv @ (src_bounds[2], src_bounds[1])
    m, v = _margin(resampling), product.valid
    c0, c1 = max(int(v.col_off), math.floor(x0) - m), min(int(v.col_off + v.width), math.ceil(x1) + m)
    r0, r1 = max(int(v.row_off), math.floor(y0) - m), min(int(v.row_off + v.height), math.ceil(y1) + m)
    if c1 <= c0 or r1 <= r0:
        return np.ma.MaskedArray(out, mask=True)
    window = Window(c0, r0, c1 - c0, r1 - r0)
    src = product.read(window)
    reproject(
        source=src.filled(fill),
        destination=out,
        src_transform=window_transform(window, product.transform),
        src_crs=product.crs,
        src_nodata=fill,
        dst_transform=dst_transform,
        dst_crs=grid.crs,
        dst_nodata=fill,
        resampling=Resampling[resampling],
    )
    return np.ma.MaskedArray(out, mask=out == fill)


def write_export(
    path: str,
    item: pystac.Item,
    collection: dict | None,
    req: ExportRequest,
    product: Product,
    grid: Grid,
    progress: Callable[[float], None] | None = None,
) -> None:
    """Write the export of ``req`` on ``grid`` to ``path`` (tiled GeoTIFF, DEFLATE), strip by strip."""
    if req.resampling not in RESAMPLINGS:
        raise InvalidExportParameters(f"`resampling` must be one of {', '.join(RESAMPLINGS)}")
    nodata = product.nodata
    fill = nodata if nodata is not None else 0
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": product.count,
        "dtype": product.dtype,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": BLOCK,
        "blockysize": BLOCK,
        "compress": "DEFLATE",
        "predictor": 2 if np.dtype(product.dtype).kind in "ui" else 3,
        "BIGTIFF": "IF_SAFER",
    }
    geom = _aoi(req, grid.crs)[1] if req.geometry is not None else None
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        for i, band in enumerate(product.bands, start=1):
            dst.set_band_description(i, band.name)
            if band.tags:
                dst.update_tags(i, **band.tags)
        if grid.window is not None and product.scales and any(s != 1 for s in product.scales):
            dst.scales = product.scales
        if grid.window is not None and product.offsets and any(o != 0 for o in product.offsets):
            dst.offsets = product.offsets
        dst.update_tags(**dataset_tags(item, collection, req, product, grid))
        for row, h in _strips(grid):
            if grid.window is not None:
                w = grid.window
                data = product.read(Window(w.col_off, w.row_off + row, w.width, h))
            else:
                data = _warped_strip(product, grid, row, h, req.resampling, fill)
            mask = np.ma.getmaskarray(data)
            if geom is not None:
                outside = geometry_mask(
                    [geom],
                    out_shape=(h, grid.width),
                    transform=grid.transform @ Affine.translation(0, row),
                    all_touched=True,
                )
                mask = mask | outside[None]
            window = Window(0, row, grid.width, h)
            dst.write(np.where(mask, fill, np.ma.getdata(data)).astype(product.dtype), window=window)
            if nodata is None:
                dst.write_mask(np.where(mask.all(axis=0), 0, 255).astype("uint8"), window=window)
            if progress is not None:
                progress((row + h) / grid.height)


def file_name(req: ExportRequest) -> str:
    """``<item>_<asset>[_<grid>].tif``, safe characters only."""
    parts = [req.item_id, req.asset or "export"]
    if req.grid != "native":
        parts.append(req.grid)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(parts)) + ".tif"
