"""STAC readers whose default stretch is the 2nd-98th percentile range written at ingest.

rio-tiler takes ``raster:bands[].statistics.minimum``/``maximum`` as an asset's
``dataset_statistics``: the input range used to bring data to 8 bits when the
output format cannot hold its type (uint16 in JPEG or WebP, float in PNG...)
and no ``rescale`` is given.
With true extremes, one hot pixel darkens the whole image. These readers use
``percentile_2``/``percentile_98`` instead when every band of the asset has
them (`tiler.stats`), and rio-tiler's behaviour otherwise. An explicit
``rescale`` still wins; expressions get no dataset statistics, as upstream.

titiler 2.3's ``rescale_array`` (the code applying this range) masks band b with
row b of the 2-D mask, so images whose first rows are nodata get black columns;
that is upstream (see tests/test_stats.py), not fixed here.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import attr
import numpy as np
from cachetools import cached
from cachetools.keys import hashkey
from geojson_pydantic.geometries import Geometry
from psycopg import errors as pg_errors
from rasterio.warp import calculate_default_transform
from rio_tiler.io import Reader
from rio_tiler.models import ImageData, PointData
from rio_tiler.types import AssetInfo, AssetType
from titiler.core.dependencies import _parse_asset
from titiler.pgstac import backend as pgstac_backend
from titiler.pgstac.backend import PGSTACBackend
from titiler.pgstac.errors import MosaicNotFoundError
from titiler.pgstac.reader import PgSTACReader, SimpleSTACReader
from titiler.pgstac.utils import retry

from tiler import deadline, mosaicsearch
from tiler.catalogue import catalogue
from tiler.deadline import Budget
from tiler.errors import InvalidPansharpenParameters
from tiler.pansharpen import brovey
from tiler.presets import PansharpenSpec
from tiler.stats import stretch_range
from tiler.upstream import SigningReader, headers_for, signer_for
from tiler.urls import refuse_redirects

#: Resampling of the MS bands when they are brought to the pan grid (unless the request says).
MS_UPSAMPLING = "bilinear"


def _with_context(info: AssetInfo, item_id: str, budget: Budget | None) -> AssetInfo:
    """Asset reader options: the ``item/asset`` label errors name, and the request's budget."""
    info["reader_options"] = {
        **info.get("reader_options", {}),
        "label": f"{item_id}/{info['name']}",
        "budget": budget,
    }
    return info


def _with_file(info: AssetInfo, href: str | None, metadata: dict) -> AssetInfo:
    """Asset reader options: the file's size and header size from the STAC ``file`` extension.

    `SigningReader` then reads the file without GDAL's size probe (`tiler.opener`). Only
    for the asset's own href (an alternate href may be another file).
    """
    size, header = metadata.get("file:size"), metadata.get("file:header_size")
    if info["url"] == href and isinstance(size, int) and not isinstance(size, bool):
        info["reader_options"]["file_size"] = size
        if isinstance(header, int) and not isinstance(header, bool):
            info["reader_options"]["header_size"] = header
    return info


def _with_stretch(info: AssetInfo, metadata: dict) -> AssetInfo:
    if "expression" in info.get("method_options", {}):
        return info
    stretch = stretch_range(metadata.get("raster:bands") or metadata.get("bands"))
    if stretch:
        info["dataset_statistics"] = stretch
    return info


def _without_layer(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Read options without the layer's own (the pansharpening spec says what to read)."""
    return {k: v for k, v in kwargs.items() if k not in ("assets", "expression", "asset_as_band")}


@functools.lru_cache(maxsize=4096)
def _geom_in_crs(crs: Any, dst_crs: Any, width: int, height: int, bounds: tuple) -> tuple:
    """``calculate_default_transform`` of a dataset grid (affine, width, height), memoized.

    rio-tiler's STAC readers compute it for every item of every request to derive the
    item's zoom range; the answer depends only on the grid, so each grid is computed once.
    """
    return calculate_default_transform(crs, dst_crs, width, height, *bounds)


class GridCacheMixin:
    """STAC readers whose item zoom range comes from `_geom_in_crs` (memoized per grid)."""

    @functools.cached_property
    def _dst_geom_in_tms_crs(self) -> Any:
        tms_crs = self.tms.rasterio_crs  # type: ignore[attr-defined]
        if self.crs == tms_crs:  # type: ignore[attr-defined]
            return super()._dst_geom_in_tms_crs  # type: ignore[misc]
        return _geom_in_crs(self.crs, tms_crs, self.width, self.height, tuple(self.bounds))  # type: ignore[attr-defined]


class PansharpenMixin:
    """``pansharpen=PansharpenSpec`` on tile/part/preview/feature/point: weighted Brovey per item.

    The MS bands are read on the grid of the output (the pan's grid for a preview, part or
    feature; the tile's grid for a tile) with bilinear resampling unless the request names
    one, the pan band on the same grid, and `tiler.pansharpen.brovey` fuses them with the
    weights of the item's ``platform``. The output keeps the MS dtype and the MS 2-98 %
    stretch of its bands, so a pansharpened tile has the contrast of the plain one.
    """

    def _platform(self) -> str | None:
        raise NotImplementedError

    def _weights(self, spec: PansharpenSpec) -> tuple[float, ...]:
        platform = self._platform()
        weights = spec.weights_for(platform)
        if weights is None:
            raise InvalidPansharpenParameters(
                f"No pansharpening weights for platform {platform!r} in this preset; "
                "give them in the collection's render (`pansharpen.weights`)."
            )
        return weights

    def _fuse(self, spec: PansharpenSpec, ms: ImageData, pan: ImageData) -> ImageData:
        n = len(spec.ms_bands)
        if ms.count != n or pan.count != 1:
            raise InvalidPansharpenParameters(
                f"expected {n} MS bands and 1 pan band, read {ms.count} and {pan.count}"
            )
        fused = brovey(ms.array, pan.array, self._weights(spec), dtype=ms.array.dtype)
        out = fused[list(spec.output)]
        stats = [ms.dataset_statistics[i] for i in spec.output] if ms.dataset_statistics else None
        return ImageData(
            out,
            assets=[*(ms.assets or []), *(pan.assets or [])],
            bounds=ms.bounds,
            crs=ms.crs,
            band_descriptions=[spec.ms_bands[i] for i in spec.output],
            dataset_statistics=stats,
            metadata={**(ms.metadata or {}), **(pan.metadata or {})},
        )

    @staticmethod
    def _ms_options(kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            **_without_layer(kwargs),
            "resampling_method": kwargs.get("resampling_method") or MS_UPSAMPLING,
            "reproject_method": kwargs.get("reproject_method") or MS_UPSAMPLING,
        }

    def _same_grid(self, spec: PansharpenSpec, read: Callable[..., ImageData], kwargs: dict) -> ImageData:
        """Tile: one call reads MS and pan in parallel (same output grid by construction)."""
        img = read(assets=_parse_asset([*spec.ms, spec.pan]), **self._ms_options(kwargs))
        n = len(spec.ms_bands)
        stats = img.dataset_statistics
        ms = ImageData(
            img.array[:n],
            bounds=img.bounds,
            crs=img.crs,
            assets=img.assets,
            dataset_statistics=stats[:n] if stats else None,
            metadata=img.metadata,
        )
        pan = ImageData(img.array[n:], bounds=img.bounds, crs=img.crs)
        return self._fuse(spec, ms, pan)

    def _pan_grid(self, spec: PansharpenSpec, read: Callable[..., ImageData], kwargs: dict) -> ImageData:
        """Preview/part/feature: the pan sets the output size; the MS is read onto it."""
        pan = read(assets=_parse_asset([spec.pan]), **_without_layer(kwargs))
        ms_kwargs = {**self._ms_options(kwargs), "max_size": None, "width": pan.width, "height": pan.height}
        ms = read(assets=_parse_asset(list(spec.ms)), **ms_kwargs)
        return self._fuse(spec, ms, pan)

    def tile(
        self, tile_x: int, tile_y: int, tile_z: int, pansharpen: PansharpenSpec | None = None, **kwargs: Any
    ) -> ImageData:
        """Read a tile; pansharpened when ``pansharpen`` is given."""
        if pansharpen is None:
            return super().tile(tile_x, tile_y, tile_z, **kwargs)  # type: ignore[misc]
        parent = super()
        return self._same_grid(pansharpen, lambda **kw: parent.tile(tile_x, tile_y, tile_z, **kw), kwargs)  # type: ignore[misc]

    def part(self, bbox: Any, pansharpen: PansharpenSpec | None = None, **kwargs: Any) -> ImageData:
        """Read a bbox; pansharpened when ``pansharpen`` is given."""
        if pansharpen is None:
            return super().part(bbox, **kwargs)  # type: ignore[misc]
        parent = super()
        return self._pan_grid(pansharpen, lambda **kw: parent.part(bbox, **kw), kwargs)  # type: ignore[misc]

    def feature(self, shape: dict, pansharpen: PansharpenSpec | None = None, **kwargs: Any) -> ImageData:
        """Read a GeoJSON feature's window; pansharpened when ``pansharpen`` is given."""
        if pansharpen is None:
            return super().feature(shape, **kwargs)  # type: ignore[misc]
        parent = super()
        return self._pan_grid(pansharpen, lambda **kw: parent.feature(shape, **kw), kwargs)  # type: ignore[misc]

    def preview(self, pansharpen: PansharpenSpec | None = None, **kwargs: Any) -> ImageData:
        """Read a preview; pansharpened when ``pansharpen`` is given."""
        if pansharpen is None:
            return super().preview(**kwargs)  # type: ignore[misc]
        parent = super()
        return self._pan_grid(pansharpen, lambda **kw: parent.preview(**kw), kwargs)  # type: ignore[misc]

    def point(
        self, lon: float, lat: float, pansharpen: PansharpenSpec | None = None, **kwargs: Any
    ) -> PointData:
        """Read a pixel; pansharpened when ``pansharpen`` is given (MS and pan at that point)."""
        if pansharpen is None:
            return super().point(lon, lat, **kwargs)  # type: ignore[misc]
        data = super().point(
            lon, lat, assets=_parse_asset([*pansharpen.ms, pansharpen.pan]), **_without_layer(kwargs)
        )  # type: ignore[misc]
        n = len(pansharpen.ms_bands)
        arr = data.array.reshape(-1, 1, 1)
        fused = brovey(arr[:n], arr[n:], self._weights(pansharpen), dtype=arr.dtype)
        out = fused[list(pansharpen.output)].reshape(-1)
        names = [pansharpen.ms_bands[i] for i in pansharpen.output]
        return PointData(
            np.ma.MaskedArray(out.data, mask=np.ma.getmaskarray(out)),
            band_names=[f"b{i}" for i in range(1, len(names) + 1)],
            band_descriptions=names,
            coordinates=data.coordinates,
            crs=data.crs,
            assets=data.assets,
            metadata=data.metadata,
            nodata=data.nodata,
            scales=[1.0] * len(names),
            offsets=[0.0] * len(names),
            pixel_location=data.pixel_location,
        )


@attr.s
class ItemReader(GridCacheMixin, PansharpenMixin, PgSTACReader):
    """Reader of one pgstac item (item and asset endpoints); assets opened by `SigningReader`."""

    reader: type[Reader] = attr.ib(default=SigningReader)
    budget: Budget | None = attr.ib(factory=deadline.current)

    def _platform(self) -> str | None:
        return self.item.properties.get("platform")

    def _get_asset_info(self, asset: AssetType) -> AssetInfo:
        info = super()._get_asset_info(asset)
        _with_context(info, self.item.id, self.budget)
        asset = self.item.assets[info["name"]]
        _with_file(info, asset.get_absolute_href() or asset.href, asset.extra_fields)
        return _with_stretch(info, asset.extra_fields)


@attr.s
class ExternalItemReader(ItemReader):
    """Reader of an item of another STAC catalogue (``/external``, `tiler.external`).

    Its hrefs were checked against the allow-list when the item was fetched; before GDAL
    opens one, the redirect check of ``/cog`` runs on it (`tiler.urls.refuse_redirects`,
    with the credential headers of its prefix). Hrefs a signer rewrites point at the
    operator's own storage and are not probed.
    """

    def _get_asset_info(self, asset: AssetType) -> AssetInfo:
        info = super()._get_asset_info(asset)
        url = info["url"]
        if signer_for(url) is None:
            refuse_redirects(url, headers=headers_for(url))
        return info


@attr.s
class MosaicItemReader(GridCacheMixin, PansharpenMixin, SimpleSTACReader):
    """Reader of the items of a mosaic (collections and registered searches); assets opened by `SigningReader`.

    Its items come from the mosaic's pgstac search with the fields of `MOSAIC_ITEM_FIELDS`.
    rio-tiler opens one per item in its own threads, where the request's context is not
    visible: `MosaicBackend` hands over the request's ``budget``, checked before each item,
    so a request past its deadline (or whose client left) reads no further item.
    """

    reader: type[Reader] = attr.ib(default=SigningReader)
    budget: Budget | None = attr.ib(default=None)

    def __attrs_post_init__(self) -> None:
        """Stop before the item when the request is out of time or its client is gone."""
        if self.budget is not None:
            self.budget.check(f"reading item {self.input.get('id')}")
        super().__attrs_post_init__()

    def _platform(self) -> str | None:
        return (self.input.get("properties") or {}).get("platform")

    def _get_asset_info(self, asset: AssetType) -> AssetInfo:
        info = super()._get_asset_info(asset)
        _with_context(info, str(self.input.get("id")), self.budget)
        asset = self.input["assets"][info["name"]]
        _with_file(info, asset.get("href"), asset)
        return _with_stretch(info, asset)


@attr.s
class MosaicBackend(PGSTACBackend):
    """titiler-pgstac's backend whose zoom range comes from the data, not the whole TMS.

    A search registered with ``minzoom``/``maxzoom`` metadata keeps them; otherwise the
    range is that of the mosaic's newest item (`tiler.catalogue.Catalogue.search_zooms`), so a TileJSON
    client does not ask for zoom 0-24 over the world. It is built in the request's thread and
    passes the request's `tiler.deadline.Budget` to the item readers.
    """

    def __attrs_post_init__(self) -> None:
        """Hand the request's budget to the item readers (they run in other threads)."""
        budget = deadline.current()
        if budget is not None and issubclass(self.reader, MosaicItemReader):
            self.reader_options = {**self.reader_options, "budget": budget}
        parent = getattr(super(), "__attrs_post_init__", None)
        if parent is not None:
            parent()

    def _zooms(self) -> tuple[int, int] | None:
        return catalogue(self.pool).search_zooms(self.input, self.tms)

    @cached(  # type: ignore[misc]
        pgstac_backend.ttl_cache,
        key=lambda self, geom, **kwargs: hashkey(self.input, str(geom), **kwargs),
        lock=threading.Lock(),
    )
    def get_assets(  # type: ignore[override]
        self,
        geom: Geometry,
        fields: dict[str, Any] | None = None,
        scan_limit: int | None = None,
        items_limit: int | None = None,
        time_limit: int | None = None,
        exitwhenfull: bool | None = None,
        skipcovered: bool | None = None,
    ) -> list[dict]:
        """titiler-pgstac's item lookup, through `tiler.mosaicsearch` when the database has it.

        Same cache, retries, defaults and errors as `PGSTACBackend.get_assets`; only the SQL
        function differs (same items in the same order, `tiler_mosaic.geometrysearch`).
        """
        config = pgstac_backend.pgstac_config
        args = (
            geom,
            fields or {"include": ["assets", "id", "bbox", "collection"]},
            scan_limit or config.scan_limit,
            items_limit or config.items_limit,
            time_limit or config.time_limit,
            config.exitwhenfull if exitwhenfull is None else exitwhenfull,
            config.skipcovered if skipcovered is None else skipcovered,
        )
        if not mosaicsearch.available(self.pool):
            # titiler-pgstac's own query (its retries, without its cache: this method has it)
            return PGSTACBackend.get_assets.__wrapped__(self, *args)  # type: ignore[attr-defined]
        return self._tile_items(*args)

    @retry(
        tries=pgstac_backend.retry_config.retry,
        delay=pgstac_backend.retry_config.delay,
        exceptions=(pg_errors.OperationalError, pg_errors.InterfaceError),
    )
    def _tile_items(self, geom: Geometry, *options: Any) -> list[dict]:
        """`mosaicsearch.search` with ``options`` = (fields, scan, items and time limits, exitwhenfull, skipcovered)."""
        with self.pool.connection() as conn:
            try:
                return mosaicsearch.search(
                    conn, geom.model_dump_json(exclude_none=True), self.input, *options
                )
            except (pg_errors.RaiseException, pg_errors.NotNullViolation) as e:
                if f"Search with Query Hash {self.input} Not Found" in str(
                    e
                ) or 'null value in column "search" of relation "searches"' in str(e):
                    raise MosaicNotFoundError(f"SearchId `{self.input}` not found") from e
                raise

    @property
    def minzoom(self) -> int:  # type: ignore[override]
        """Search metadata, else the data's minzoom, else the TMS's."""
        meta = self.info().metadata
        if meta.minzoom is not None:
            return meta.minzoom
        zooms = self._zooms()
        return zooms[0] if zooms else self.tms.minzoom

    @property
    def maxzoom(self) -> int:  # type: ignore[override]
        """Search metadata, else the data's maxzoom, else the TMS's."""
        meta = self.info().metadata
        if meta.maxzoom is not None:
            return meta.maxzoom
        zooms = self._zooms()
        return zooms[1] if zooms else self.tms.maxzoom
