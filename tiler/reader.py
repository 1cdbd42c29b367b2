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

import attr
from rio_tiler.io import Reader
from rio_tiler.types import AssetInfo, AssetType
from titiler.pgstac.reader import PgSTACReader, SimpleSTACReader

from tiler.stats import stretch_range
from tiler.upstream import SigningReader


def _with_stretch(info: AssetInfo, metadata: dict) -> AssetInfo:
    if "expression" in info.get("method_options", {}):
        return info
    stretch = stretch_range(metadata.get("raster:bands") or metadata.get("bands"))
    if stretch:
        info["dataset_statistics"] = stretch
    return info


@attr.s
class ItemReader(PgSTACReader):
    """Reader of one pgstac item (item and asset endpoints); assets opened by `SigningReader`."""

    reader: type[Reader] = attr.ib(default=SigningReader)

    def _get_asset_info(self, asset: AssetType) -> AssetInfo:
        info = super()._get_asset_info(asset)
        return _with_stretch(info, self.item.assets[info["name"]].extra_fields)


@attr.s
class MosaicItemReader(SimpleSTACReader):
    """Reader of the items of a mosaic (collections and registered searches); assets opened by `SigningReader`."""

    reader: type[Reader] = attr.ib(default=SigningReader)

    def _get_asset_info(self, asset: AssetType) -> AssetInfo:
        info = super()._get_asset_info(asset)
        return _with_stretch(info, self.input["assets"][info["name"]])
