"""Synthetic SPOT 6/7-like scenes: multispectral + panchromatic COGs and STAC items.

The landscape is a deterministic function of map coordinates (fields, forest,
a river, a town), so overlapping scenes show the same ground. Each scene has
its own radiometric gain, so a mosaic test can tell which scene a pixel came
from. The high-resolution 4-band "truth" is computed on the 1.5 m pan grid;
the MS image is its 4x4 block mean (6 m) and the pan band is a weighted sum of
the truth bands (the weights of `PAN_WEIGHTS`), which is what makes an honest
pansharpening test possible.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy
from rasterio.transform import Affine
from rasterio.warp import transform_bounds, transform_geom

CRS_EPSG = 32631  # UTM 31N, like SPOT 6/7 ortho products over southern France
ORIGIN = (566_000.0, 4_834_000.0)  # near Montpellier
MS_RES = 6.0
PAN_RES = 1.5
RATIO = int(MS_RES / PAN_RES)
NODATA = 0
COLLECTION_ID = "spot67-demo"

#: Common names and wavelengths (micrometres) of the MS bands, in file order.
MS_BANDS = [
    ("B0", "blue", 0.485, 0.07),
    ("B1", "green", 0.560, 0.08),
    ("B2", "red", 0.660, 0.07),
    ("B3", "nir", 0.825, 0.11),
]
#: Quicklook (the products' georeferenced RGB overview): 8-bit, this many MS pixels per pixel.
QL_FACTOR = 4
QL_RANGE = (200, 1800)  # DN mapped to 1..255 (0 is nodata)

#: Weights of the MS truth bands (blue, green, red, nir) in the pan band.
PAN_WEIGHTS = (0.25, 0.35, 0.35, 0.05)

# Class signatures (blue, green, red, nir) as uint16 DN (reflectance x 10000).
_CLASSES = np.array(
    [
        [620, 520, 360, 210],  # water
        [420, 760, 480, 3600],  # crop, green
        [980, 1150, 1380, 1900],  # bare soil
        [1250, 1280, 1330, 1550],  # urban
        [330, 520, 330, 2900],  # forest
        [700, 900, 820, 2600],  # grassland
    ],
    dtype="float32",
)
WATER, CROP, SOIL, URBAN, FOREST, GRASS = range(6)


@dataclass(frozen=True)
class Scene:
    """Geometry and radiometry of one synthetic scene."""

    index: int
    x0: float
    y0: float
    ms_size: int
    gain: float
    angle_deg: float
    datetime: dt.datetime
    platform: str

    @property
    def item_id(self) -> str:
        """STAC item id, in the style of DINAMIS product names."""
        return f"{self.platform.upper().replace('-', '')}_{self.datetime:%Y%m%d_%H%M%S}_S{self.index:02d}"

    @property
    def pan_size(self) -> int:
        """Pan raster width and height."""
        return self.ms_size * RATIO

    def transform(self, res: float) -> Affine:
        """Affine transform for a grid of resolution ``res``."""
        return Affine(res, 0.0, self.x0, 0.0, -res, self.y0)

    def footprint(self) -> np.ndarray:
        """Corners (x, y) of the rotated valid-data footprint, closed ring."""
        size = self.ms_size * MS_RES
        cx, cy = self.x0 + size / 2, self.y0 - size / 2
        half = size * 0.42
        a = np.deg2rad(self.angle_deg)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        corners = np.array([[-half, -half], [half, -half], [half, half], [-half, half]]) @ rot.T
        ring = corners + [cx, cy]
        return np.vstack([ring, ring[:1]])


def _inside(ring: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vectorised test of points inside a convex counter-clockwise ring."""
    ok = np.ones(np.broadcast(x, y).shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:], strict=True):
        ok &= (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0
    return ok


def _waves(x: np.ndarray, y: np.ndarray, seed: int, n: int, wl: tuple[float, float]) -> np.ndarray:
    """Sum of ``n`` plane waves with wavelengths in ``wl`` (metres), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    out = np.zeros(np.broadcast(x, y).shape, dtype="float32")
    for _ in range(n):
        k = 2 * np.pi / rng.uniform(*wl)
        a = rng.uniform(0, np.pi)
        out += np.sin(k * (np.cos(a) * x + np.sin(a) * y) + rng.uniform(0, 2 * np.pi)).astype("float32")
    return out / n


def landscape(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground reflectance (4, H, W) float32 at map coordinates ``x`` (1, W), ``y`` (H, 1)."""
    # fields: a rotated grid of parcels, each with a class drawn by hashing its index
    a = np.deg2rad(17.0)
    u = (np.cos(a) * x + np.sin(a) * y) / 230.0
    v = (-np.sin(a) * x + np.cos(a) * y) / 160.0
    iu, iv = np.floor(u).astype("int64"), np.floor(v).astype("int64")
    h = (iu * 73856093) ^ (iv * 19349663)
    cls = np.array([CROP, SOIL, GRASS, CROP, FOREST, SOIL, GRASS], dtype="int64")[h % 7]
    # town and forest blobs from low-frequency waves
    low = _waves(x, y, 1, 5, (2500, 6000))
    cls = np.where(low > 0.45, URBAN, cls)
    cls = np.where(low < -0.5, FOREST, cls)
    # a meandering river
    centre = ORIGIN[1] - 3500 + 700 * np.sin((x - ORIGIN[0]) / 900.0) + 250 * np.sin((x - ORIGIN[0]) / 310.0)
    cls = np.where(np.abs(y - centre) < 45, WATER, cls)
    # field edges (hedges/roads) one pixel-ish wide
    edge = (np.abs(u - np.round(u)) < 0.02) | (np.abs(v - np.round(v)) < 0.03)
    cls = np.where(edge & (cls != WATER), GRASS, cls)

    sig = _CLASSES[cls]  # (H, W, 4)
    texture = 1.0 + 0.10 * _waves(x, y, 2, 6, (40, 400)) + 0.05 * _waves(x, y, 3, 4, (6, 30))
    out = sig * texture[..., None]
    return np.moveaxis(out, -1, 0).astype("float32")


def default_scenes(n: int = 3, ms_size: int = 512) -> list[Scene]:
    """``n`` overlapping scenes shifted diagonally by 45 % of their width."""
    step = ms_size * MS_RES * 0.45
    platforms = ["spot-6", "spot-7"]
    base = dt.datetime(2024, 5, 3, 10, 21, 30, tzinfo=dt.UTC)
    return [
        Scene(
            index=i,
            x0=ORIGIN[0] + i * step,
            y0=ORIGIN[1] - i * step * 0.6,
            ms_size=ms_size,
            gain=1.0 + 0.12 * i,
            angle_deg=6.0 + 2.0 * i,
            datetime=base + dt.timedelta(days=37 * i, minutes=3 * i),
            platform=platforms[i % 2],
        )
        for i in range(n)
    ]


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (truth (4,P,P) float32 at 1.5 m, ms (4,M,M) uint16, pan (1,P,P) uint16)."""
    p = scene.pan_size
    xs = scene.x0 + (np.arange(p, dtype="float64") + 0.5) * PAN_RES
    ys = scene.y0 - (np.arange(p, dtype="float64") + 0.5) * PAN_RES
    truth = landscape(xs[None, :], ys[:, None]) * scene.gain

    ring = scene.footprint()
    pan_mask = _inside(ring, xs[None, :], ys[:, None])
    m = scene.ms_size
    msx = scene.x0 + (np.arange(m) + 0.5) * MS_RES
    msy = scene.y0 - (np.arange(m) + 0.5) * MS_RES
    ms_mask = _inside(ring, msx[None, :], msy[:, None])

    ms = truth.reshape(4, m, RATIO, m, RATIO).mean(axis=(2, 4))
    pan = np.tensordot(np.asarray(PAN_WEIGHTS, dtype="float32"), truth, axes=1)[None]
    ms_u16 = np.clip(np.rint(ms), 1, 65535).astype("uint16")
    pan_u16 = np.clip(np.rint(pan), 1, 65535).astype("uint16")
    ms_u16[:, ~ms_mask] = NODATA
    pan_u16[:, ~pan_mask] = NODATA
    return truth, ms_u16, pan_u16


def quicklook(ms: np.ndarray) -> np.ndarray:
    """8-bit RGB quicklook of an MS array: QL_FACTOR x QL_FACTOR block means, QL_RANGE stretch."""
    m = ms.shape[1] // QL_FACTOR
    rgb = ms[[2, 1, 0], : m * QL_FACTOR, : m * QL_FACTOR].astype("float64")
    valid = (rgb > 0).all(axis=0).reshape(m, QL_FACTOR, m, QL_FACTOR).all(axis=(1, 3))
    mean = rgb.reshape(3, m, QL_FACTOR, m, QL_FACTOR).mean(axis=(2, 4))
    lo, hi = QL_RANGE
    out = np.clip(np.rint((mean - lo) / (hi - lo) * 254 + 1), 1, 255).astype("uint8")
    out[:, ~valid] = NODATA
    return out


def write_cog(path: Path, data: np.ndarray, transform: Affine, descriptions: Sequence[str]) -> None:
    """Write ``data`` as a COG: 512 px tiles, deflate, overviews, nodata 0."""
    profile = {
        "driver": "GTiff",
        "dtype": data.dtype.name,
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "crs": f"EPSG:{CRS_EPSG}",
        "transform": transform,
        "nodata": NODATA,
    }
    with MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(data)
            for i, d in enumerate(descriptions, start=1):
                tmp.set_band_description(i, d)
        with mem.open() as src:
            rio_copy(
                src,
                str(path),
                driver="COG",
                BLOCKSIZE=512,
                COMPRESS="DEFLATE",
                PREDICTOR=2,
                LEVEL=6,
                OVERVIEW_RESAMPLING="AVERAGE",
                NUM_THREADS="ALL_CPUS",
            )


def header_size(path: Path) -> int:
    """Bytes before the first tile of any level: what a reader must fetch to open the file."""
    offsets = []
    with rasterio.open(path) as src:
        nlevels = len(src.overviews(1))
    for level in [None, *range(nlevels)]:
        opts = {} if level is None else {"overview_level": level}
        with rasterio.open(path, **opts) as src:
            off = src.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1)
            if off:
                offsets.append(int(off))
    return min(offsets)


def _raster_bands(n: int, res: float, dtype: str = "uint16") -> list[dict]:
    return [{"data_type": dtype, "nodata": NODATA, "spatial_resolution": res} for _ in range(n)]


def scene_item(scene: Scene, cog_dir: Path, base_url: str, collection: str = COLLECTION_ID) -> dict:
    """STAC item (dict) for a scene whose COGs are already in ``cog_dir``."""
    ring = scene.footprint()
    geom = transform_geom(
        f"EPSG:{CRS_EPSG}", "EPSG:4326", {"type": "Polygon", "coordinates": [ring.tolist()]}
    )
    xs, ys = ring[:, 0], ring[:, 1]
    bbox = list(transform_bounds(f"EPSG:{CRS_EPSG}", "EPSG:4326", xs.min(), ys.min(), xs.max(), ys.max()))
    size = scene.ms_size * MS_RES
    proj_bbox = [scene.x0, scene.y0 - size, scene.x0 + size, scene.y0]
    base = base_url.rstrip("/")

    def asset(
        name: str,
        title: str,
        res: float,
        shape: int,
        bands: list[dict],
        roles: list[str],
        dtype: str = "uint16",
    ) -> dict:
        fname = f"{scene.item_id}_{name.upper()}.tif"
        path = cog_dir / fname
        return {
            "href": f"{base}/{fname}",
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "title": title,
            "roles": roles,
            "gsd": res,
            "eo:bands": bands,
            "raster:bands": _raster_bands(len(bands), res, dtype),
            "proj:shape": [shape, shape],
            "proj:transform": list(scene.transform(res))[:6],
            "proj:bbox": proj_bbox,
            "file:size": path.stat().st_size,
            "file:header_size": header_size(path),
        }

    ms_bands = [
        {"name": n, "common_name": c, "center_wavelength": w, "full_width_half_max": f}
        for n, c, w, f in MS_BANDS
    ]
    pan_bands = [{"name": "P", "common_name": "pan", "center_wavelength": 0.6, "full_width_half_max": 0.3}]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
            "https://stac-extensions.github.io/file/v2.1.0/schema.json",
            "https://stac-extensions.github.io/view/v1.0.0/schema.json",
        ],
        "id": scene.item_id,
        "collection": collection,
        "geometry": geom,
        "bbox": bbox,
        "properties": {
            "datetime": scene.datetime.isoformat().replace("+00:00", "Z"),
            "platform": scene.platform,
            "constellation": "spot",
            "instruments": ["naomi"],
            "gsd": MS_RES,
            "eo:cloud_cover": round(3.0 + 7.5 * scene.index, 1),
            "view:off_nadir": round(4.0 + 3.0 * scene.index, 1),
            "proj:epsg": CRS_EPSG,
            "dinamis:sample_gain": scene.gain,
        },
        "assets": {
            "ms": asset(
                "ms",
                "Multispectral 6 m (B0 blue, B1 green, B2 red, B3 NIR)",
                MS_RES,
                scene.ms_size,
                ms_bands,
                ["data"],
            ),
            "pan": asset("pan", "Panchromatic 1.5 m", PAN_RES, scene.pan_size, pan_bands, ["data"]),
            "overview": asset(
                "ql",
                f"Quicklook {MS_RES * QL_FACTOR:g} m (RGB, 8-bit)",
                MS_RES * QL_FACTOR,
                scene.ms_size // QL_FACTOR,
                [{"name": n, "common_name": c} for n, c in (("R", "red"), ("G", "green"), ("B", "blue"))],
                ["overview"],
                "uint8",
            ),
        },
        "links": [],
    }


def collection_doc(items: list[dict], collection: str = COLLECTION_ID) -> dict:
    """STAC collection covering ``items``, with item_assets and a true-colour render."""
    bboxes = np.array([it["bbox"] for it in items])
    times = sorted(it["properties"]["datetime"] for it in items)
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/item-assets/v1.0.0/schema.json",
            "https://stac-extensions.github.io/render/v1.0.0/schema.json",
        ],
        "id": collection,
        "title": "SPOT 6/7 sample (synthetic)",
        "description": "Synthetic SPOT 6/7-like ortho scenes generated by `tiler sample-data`.",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[*bboxes[:, :2].min(axis=0).tolist(), *bboxes[:, 2:].max(axis=0).tolist()]]},
            "temporal": {"interval": [[times[0], times[-1]]]},
        },
        "item_assets": {
            k: {key: a[key] for key in ("type", "title", "roles", "gsd", "eo:bands")}
            for k, a in items[0]["assets"].items()
        },
        "renders": {
            # This synthetic sensor's pan is PAN_WEIGHTS . truth: its own pansharpening weights
            # replace the built-in SPOT 6/7 estimates (a provider would do the same for a sensor
            # whose response it knows).
            "pansharpened": {
                "title": "Pansharpened natural colour (1.5 m)",
                "bands": ["red", "green", "blue"],
                "pansharpen": {
                    "pan": "pan",
                    "weights": {"*": dict(zip([b[1] for b in MS_BANDS], PAN_WEIGHTS, strict=True))},
                },
            },
        },
        "summaries": {
            "platform": sorted({it["properties"]["platform"] for it in items}),
            "gsd": [MS_RES, PAN_RES],
        },
        "links": [],
    }


def generate(
    out_dir: Path,
    base_url: str,
    n_scenes: int = 3,
    ms_size: int = 512,
    collection: str = COLLECTION_ID,
) -> tuple[dict, list[dict]]:
    """Write COGs, ``items.ndjson`` and ``collection.json`` to ``out_dir``; return them.

    COGs already present (same size) are reused, so a second run is fast.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for scene in default_scenes(n_scenes, ms_size):
        ms_path = out_dir / f"{scene.item_id}_MS.tif"
        pan_path = out_dir / f"{scene.item_id}_PAN.tif"
        ql_path = out_dir / f"{scene.item_id}_QL.tif"
        if not (
            _has_size(ms_path, scene.ms_size)
            and _has_size(pan_path, scene.pan_size)
            and _has_size(ql_path, scene.ms_size // QL_FACTOR)
        ):
            _, ms, pan = render_scene(scene)
            write_cog(ms_path, ms, scene.transform(MS_RES), [b[0] for b in MS_BANDS])
            write_cog(pan_path, pan, scene.transform(PAN_RES), ["P"])
            write_cog(ql_path, quicklook(ms), scene.transform(MS_RES * QL_FACTOR), ["R", "G", "B"])
        items.append(scene_item(scene, out_dir, base_url, collection))
    coll = collection_doc(items, collection)
    (out_dir / "collection.json").write_text(json.dumps(coll, indent=2))
    (out_dir / "items.ndjson").write_text("".join(json.dumps(it) + "\n" for it in items))
    return coll, items


def _has_size(path: Path, size: int) -> bool:
    if not path.exists():
        return False
    try:
        with rasterio.open(path) as src:
            return src.width == size
    except rasterio.RasterioIOError:
        return False
