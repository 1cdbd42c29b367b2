"""Independent expectations: tile grids and source pixels computed with pyproj + numpy."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from pyproj import Transformer
from rasterio.enums import ColorInterp

from tiler.auth import hash_api_key
from tiler.settings import AuthSettings

R = 6378137.0
ORIGIN_SHIFT = math.pi * R


def mercator_tile(lon: float, lat: float, z: int) -> tuple[int, int]:
    """XYZ tile containing lon/lat (standard slippy-map formula)."""
    n = 2**z
    x = int((lon + 180.0) / 360.0 * n)
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return x, y


def mercator_tile_centres(x: int, y: int, z: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """EPSG:3857 coordinates of the pixel centres of tile z/x/y."""
    span = 2 * ORIGIN_SHIFT / 2**z
    minx = -ORIGIN_SHIFT + x * span
    maxy = ORIGIN_SHIFT - y * span
    res = span / size
    xs = minx + (np.arange(size) + 0.5) * res
    ys = maxy - (np.arange(size) + 0.5) * res
    return np.meshgrid(xs, ys)


def expected_nearest(path, xs: np.ndarray, ys: np.ndarray, src_crs_of_xy: str = "EPSG:3857"):
    """Nearest-neighbour sample of the source COG at the given coordinates.

    Returns (values (bands, H, W), valid mask (H, W)); outside the raster or on
    nodata is invalid.
    """
    with rasterio.open(path) as src:
        arr = src.read()
        nodata = src.nodata
        tr = Transformer.from_crs(src_crs_of_xy, src.crs, always_xy=True)
        sx, sy = tr.transform(xs, ys)
        t = src.transform  # north-up: x = c + col * a, y = f + row * e
        cols = np.floor((np.asarray(sx) - t.c) / t.a).astype(int)
        rows = np.floor((np.asarray(sy) - t.f) / t.e).astype(int)
        inside = (cols >= 0) & (rows >= 0) & (cols < src.width) & (rows < src.height)
        cols_c, rows_c = np.clip(cols, 0, src.width - 1), np.clip(rows, 0, src.height - 1)
        values = arr[:, rows_c, cols_c]
        valid = inside & np.all(values != nodata, axis=0)
    return values, valid


def read_tif(content: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode a GeoTIFF response: (data, valid mask from the dataset mask)."""
    with rasterio.MemoryFile(content) as mem, mem.open() as ds:
        data = ds.read()
        if ds.colorinterp[-1] == ColorInterp.alpha:
            return data[:-1], data[-1] > 0
        return data, ds.dataset_mask() > 0


def read_png(content: bytes) -> np.ndarray:
    """Decode a PNG/JPEG/WebP response to (H, W, C) uint8."""
    return np.asarray(Image.open(io.BytesIO(content)))


def lonlat_of_item_centre(item: dict) -> tuple[float, float]:
    """Centre of an item's footprint bbox."""
    w, s, e, n = item["bbox"]
    return (w + e) / 2, (s + n) / 2


def item_centre_tile(item: dict, z: int) -> tuple[int, int]:
    """XYZ tile at zoom ``z`` holding the centre of an item's footprint bbox."""
    return mercator_tile(*lonlat_of_item_centre(item), z)


# --------------------------------------------------------------------------- upstream signing (tests)

#: State of the test signer: the signature the "archive" currently accepts, and the calls made.
SIGNER = {"current": "v1", "cache": {}, "calls": []}


def test_signer(href: str, refresh: bool = False) -> str:
    """A signer hook like a real one: caches a signed href until asked to refresh."""
    SIGNER["calls"].append(refresh)
    if refresh or href not in SIGNER["cache"]:
        SIGNER["cache"][href] = f"{href}?sig={SIGNER['current']}"
    return SIGNER["cache"][href]


def non_http_signer(href: str, refresh: bool = False) -> str:
    """A broken signer hook: its signed href is not an HTTP(S) URL (and carries a signature)."""
    return "ftp://storage.invalid/" + href.rsplit("/", 1)[-1] + "?sig=not-for-clients"


def grid_tile(
    x: float, y: float, origin: tuple[float, float], cell: float, size: int = 256
) -> tuple[int, int]:
    """(col, row) of the tile holding map point x/y in a top-left-origin grid of ``cell`` metres."""
    span = cell * size
    return math.floor((x - origin[0]) / span), math.floor((origin[1] - y) / span)


def grid_tile_centres(
    col: int, row: int, origin: tuple[float, float], cell: float, size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of the pixel centres of tile col/row: origin + col * tile span."""
    minx = origin[0] + col * cell * size
    maxy = origin[1] - row * cell * size
    xs = minx + (np.arange(size) + 0.5) * cell
    ys = maxy - (np.arange(size) + 0.5) * cell
    return np.meshgrid(xs, ys)


def copy_items(sample, directory, collection: str, mutate=None) -> list:
    """Write the sample collection and items under another collection id; return the two paths."""
    coll = dict(sample.collection, id=collection)
    items = [dict(json.loads(json.dumps(it)), collection=collection) for it in sample.items]
    if mutate:
        mutate(items)
    (directory / "collection.json").write_text(json.dumps(coll))
    (directory / "items.ndjson").write_text("".join(json.dumps(i) + "\n" for i in items))
    return [directory / "collection.json", directory / "items.ndjson"]


def write_auth(
    directory: Path, policy: str, users: Iterable[tuple[str, str, str]], signing_keys: str
) -> AuthSettings:
    """Access control from files: ``policy.yaml`` and ``keys.yaml`` written under ``directory``.

    ``users`` are ``(user, API key, group)``; each key gets the id ``<user>-1``. The files
    and the revocation list are checked for changes on every request (``reload_interval=0``).
    """
    (directory / "policy.yaml").write_text(policy)
    (directory / "keys.yaml").write_text(
        "keys:\n"
        + "".join(
            f"  - id: {u}-1\n    sha256: {hash_api_key(k)}\n    user: {u}\n    groups: [{g}]\n"
            for u, k, g in users
        )
    )
    return auth_settings(directory, signing_keys)


def auth_settings(directory: Path, signing_keys: str) -> AuthSettings:
    """Access control from the ``policy.yaml`` and ``keys.yaml`` under ``directory`` (see `write_auth`)."""
    return AuthSettings(
        enabled=True,
        policy_file=str(directory / "policy.yaml"),
        api_keys_file=str(directory / "keys.yaml"),
        signing_keys=signing_keys,
        reload_interval=0,
    )


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@contextlib.contextmanager
def run_nginx(directory: Path, www: Path, server: str = "", http: str = "") -> Iterator[tuple[str, Path]]:
    """A real nginx on 127.0.0.1 serving ``www`` (its root): yields (base URL, access log).

    ``server`` goes into its one server block (locations), ``http`` into the http block. The
    access log has one line per request: ``METHOD URI "Range" STATUS``.
    """
    assert NGINX is not None, "nginx is not installed"
    (directory / "tmp").mkdir(exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = directory / "access.log"
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "".join(
        f"  {kind}_temp_path {directory / 'tmp'};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (directory / "nginx.conf").write_text(
        f"""{user}worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
  types {{ image/tiff tif; }}
  default_type application/octet-stream;
{temp}  log_format ranges '$request_method $uri "$http_range" $status';
{http}
  server {{
    listen 127.0.0.1:{port};
    root {www};
    access_log {log} ranges;
{server}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [
            NGINX,
            "-e",
            str(directory / "error.log"),
            "-c",
            str(directory / "nginx.conf"),
            "-p",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("nginx did not start: " + (directory / "error.log").read_text())
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)
