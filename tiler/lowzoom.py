"""Low-zoom tiles: warp only the part of the tile a dataset covers (`LowZoomMixin`).

rio-tiler's ``Reader.tile`` warps the whole tile extent at the dataset's native
resolution: a z8 tile (156 km) over a 6 km scene is a ~17,000 px wide, mostly
empty warp grid, seconds of GDAL CPU. `LowZoomMixin` reads the footprint's
sub-window of the tile's grid with the reader's own ``part`` and pastes it into a
masked full-size tile. `tiler.upstream.SigningReader` (every asset read: items,
mosaics, pansharpening) has it; STAC readers get it through their asset reader.
"""

from __future__ import annotations

import functools
from typing import Any

import attr
import numpy as np
from morecantile import Tile
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rio_tiler.models import ImageData

#: The low-zoom path (`LowZoomMixin.tile`) is taken when the dataset's footprint covers at
#: most this fraction of the tile's pixel grid (the warp then shrinks at least 4x).
LOWZOOM_MAX_COVER = 0.25
#: Output pixels added around the footprint's sub-window (covers resampling at its edge).
LOWZOOM_MARGIN = 2


@functools.lru_cache(maxsize=4096)
def _footprint(crs: Any, dst_crs: Any, bounds: tuple) -> tuple[float, float, float, float] | None:
    """A dataset's bounds in ``dst_crs`` (densified), memoized per grid; None if they cannot be."""
    try:
        return transform_bounds(crs, dst_crs, *bounds, densify_pts=21)
    except Exception:  # noqa: BLE001 - outside the projection's domain
        return None


def _fill_value(nodata: Any, dtype: np.dtype) -> Any:
    """What rio-tiler leaves under the mask: the nodata value when ``dtype`` holds it, else 0."""
    if nodata is None:
        return 0
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        ok = np.isfinite(nodata) and info.min <= nodata <= info.max and float(nodata).is_integer()
        return int(nodata) if ok else 0
    return nodata


def _paste(sub: ImageData, win: Window, bounds: tuple[float, ...], width: int, height: int) -> ImageData:
    """``sub`` (read on ``win`` of a ``width`` x ``height`` grid) in a full-size masked tile."""
    rows = slice(int(win.row_off), int(win.row_off + win.height))
    cols = slice(int(win.col_off), int(win.col_off + win.width))
    arr = sub.array
    data = np.full((arr.shape[0], height, width), _fill_value(sub.nodata, arr.dtype), dtype=arr.dtype)
    mask = np.ones(data.shape, dtype=bool)
    data[:, rows, cols] = arr.data
    mask[:, rows, cols] = np.ma.getmaskarray(arr)
    alpha = None
    if sub.alpha_mask is not None:
        alpha = np.zeros((height, width), dtype=sub.alpha_mask.dtype)
        alpha[rows, cols] = sub.alpha_mask
    cutline = None
    if sub.cutline_mask is not None:
        cutline = np.ones((height, width), dtype=sub.cutline_mask.dtype)
        cutline[rows, cols] = sub.cutline_mask
    return attr.evolve(
        sub,
        array=np.ma.MaskedArray(data, mask=mask),
        bounds=bounds,
        alpha_mask=alpha,
        cutline_mask=cutline,
    )


@attr.s
class LowZoomMixin:
    """A rio-tiler ``Reader`` mixin whose ``tile`` reads only the footprint's sub-window when small.

    Put it before the reader class (``class R(LowZoomMixin, Reader)``): the normal path and
    the sub-window read go through the reader's own ``tile`` (``super()``) and ``part``.
    """

    def tile(
        self,
        tile_x: int,
        tile_y: int,
        tile_z: int,
        tilesize: int | None = None,
        indexes: Any = None,
        expression: str | None = None,
        buffer: float | None = None,
        **kwargs: Any,
    ) -> ImageData:
        """A tile, reading only the part of its grid the dataset covers when that part is small.

        When the dataset's footprint covers at most `LOWZOOM_MAX_COVER` of the
        tile's pixel grid, the covered sub-window (whole output pixels plus a
        margin) is read with ``part`` on the same grid and pasted into a masked
        full-size tile; otherwise this is the next class's ``tile`` (rio-tiler's).
        """
        grid = self._lowzoom_grid(tile_x, tile_y, tile_z, tilesize, buffer, {**self.options, **kwargs})
        if grid is None:
            return super().tile(  # type: ignore[misc]
                tile_x,
                tile_y,
                tile_z,
                tilesize=tilesize,
                indexes=indexes,
                expression=expression,
                buffer=buffer,
                **kwargs,
            )
        bounds, width, height, win = grid
        crs = self.tms.rasterio_crs
        sub = self.part(
            window_bounds(win, from_bounds(*bounds, width, height)),
            dst_crs=crs,
            bounds_crs=crs,
            width=int(win.width),
            height=int(win.height),
            max_size=None,
            indexes=indexes,
            expression=expression,
            **kwargs,
        )
        return _paste(sub, win, bounds, width, height)

    def _lowzoom_grid(
        self, tile_x: int, tile_y: int, tile_z: int, tilesize: int | None, buffer: float | None, options: dict
    ) -> tuple[tuple[float, float, float, float], int, int, Window] | None:
        """The tile's output grid and the sub-window the dataset covers, or None for the normal path.

        None when no reprojection is needed, when an option depends on the whole
        tile's extent (``minimum_overlap``, ``align_bounds_with_dataset``), when the
        buffer is invalid (rio-tiler raises), when the footprint (memoized per grid)
        misses the tile (rio-tiler's ``tile_exists`` then raises `TileOutsideBounds`)
        or covers more than `LOWZOOM_MAX_COVER` of the grid. Nothing here transforms
        coordinates per request, so the usual path costs no more than rio-tiler's.
        """
        crs = self.tms.rasterio_crs
        if self.crs == crs or options.get("minimum_overlap") or options.get("align_bounds_with_dataset"):
            return None
        if buffer and buffer % 0.5:
            return None
        matrix = self.tms.matrix(tile_z)
        width, height = tilesize or matrix.tileWidth, tilesize or matrix.tileHeight
        left, bottom, right, top = self.tms.xy_bounds(Tile(x=tile_x, y=tile_y, z=tile_z))
        if buffer:  # as rio-tiler's part: the bounds grow by `buffer` pixels, the size by 2 * buffer
            dx, dy = (right - left) / width * buffer, (top - bottom) / height * buffer
            left, bottom, right, top = left - dx, bottom - dy, right + dx, top + dy
            width, height = width + int(2 * buffer), height + int(2 * buffer)
        footprint = _footprint(self.crs, crs, tuple(self.bounds))
        if footprint is None:  # outside the projection's domain: let rio-tiler decide
            return None
        fl, fb, fr, ft = footprint
        if not all(np.isfinite((fl, fb, fr, ft))) or fl >= fr or fb >= ft:  # e.g. across the antimeridian
            return None
        if fr <= left or fl >= right or ft <= bottom or fb >= top:  # outside: rio-tiler raises
            return None
        xres, yres = (right - left) / width, (top - bottom) / height
        m = LOWZOOM_MARGIN
        col0 = max(0, int(np.floor((fl - left) / xres)) - m)
        col1 = min(width, int(np.ceil((fr - left) / xres)) + m)
        row0 = max(0, int(np.floor((top - ft) / yres)) - m)
        row1 = min(height, int(np.ceil((top - fb) / yres)) + m)
        if col1 <= col0 or row1 <= row0:
            return None
        if (col1 - col0) * (row1 - row0) > LOWZOOM_MAX_COVER * width * height:
            return None
        return (left, bottom, right, top), width, height, Window(col0, row0, col1 - col0, row1 - row0)
