"""Jinja templates (ours first, then titiler-pgstac's and titiler's) and the WMTS layers of each preset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from rasterio.crs import CRS
from rio_tiler.errors import MissingAssets
from starlette.requests import Request
from starlette.templating import Jinja2Templates
from titiler.pgstac.reader import PgSTACReader

from tiler.catalogue import catalogue
from tiler.presets import PresetContext, item_context
from tiler.tms import bbox_in_tms

HERE = Path(__file__).parent


def native_extent(request: Request) -> tuple[CRS, tuple[float, float, float, float]] | None:
    """CRS and bounds (projection extension) of the item this request reads, if any; no I/O."""
    item = getattr(request.state, "stac_item", None)
    if item is None:
        return None
    try:
        with PgSTACReader(item) as src:
            return src.crs, tuple(src.bounds)
    except MissingAssets:
        return None


def templates() -> Jinja2Templates:
    """The templates of every HTML and XML page (WMTS capabilities, viewers, landing)."""
    env = jinja2.Environment(
        autoescape=jinja2.select_autoescape(["html", "xml"]),
        loader=jinja2.ChoiceLoader(
            [
                jinja2.FileSystemLoader(str(HERE / "templates")),
                jinja2.PackageLoader("titiler.pgstac", "templates"),
                jinja2.PackageLoader("titiler.core", "templates"),
            ]
        ),
    )
    # wmts.xml: each layer's BoundingBox in its TileMatrixSet's CRS
    env.globals["tms_bbox"] = bbox_in_tms
    env.globals["native_extent"] = native_extent
    return Jinja2Templates(env=env)


def preset_layers(ctx: PresetContext) -> dict[str, dict[str, Any]]:
    """One WMTS layer per preset the data has: ``?preset=<name>``, zooms from ``minmax_zoom``."""
    layers: dict[str, dict[str, Any]] = {}
    for name, preset in ctx.available.items():
        values: dict[str, Any] = {"preset": name}
        if preset.minmax_zoom:
            values["tilematrixsets"] = {"*": preset.minmax_zoom}
        layers[name] = values
    return layers


def search_layers(src: Any) -> dict:
    """WMTS layers of a mosaic (``src``: titiler-pgstac's backend): its collections' presets."""
    return preset_layers(catalogue(src.pool).presets(search_id=src.input))


def external_layers(src: Any) -> dict:
    """``get_renders`` of the ``/external`` factory: a layer per preset, each with the item's ``url=``."""
    url = src.item.get_self_href()
    return {name: {"url": url, **values} for name, values in preset_layers(item_context(src.item)).items()}


def item_layers(pool_getter: Any) -> Any:
    """``get_renders`` of the item factory: the WMTS layers of an item (`ItemReader`), its presets."""

    def layers(src: Any) -> dict:
        item = src.item
        return preset_layers(
            catalogue(pool_getter()).presets(collection_id=item.collection_id, item_id=item.id, item=item)
        )

    return layers
