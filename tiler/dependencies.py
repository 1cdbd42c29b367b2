"""FastAPI dependencies: item, asset, /cog and /external paths, GDAL environment, presets, layers, render, colormap.

FastAPI runs every plain ``def`` dependency in its thread pool: a tile request made 14 hops
between the event loop and the pool before its endpoint even started, each a wake-up of both
threads. `install_inline_dependencies` has the ones that only parse the request (titiler's
parameter classes, the layer, render and colormap options) called on the event loop; those
that read the catalogue (the item, the preset) still run in the pool. See `runs_inline`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Annotated, Any

import pystac
from fastapi import Depends, Path, Query
from morecantile.errors import InvalidIdentifier
from pydantic import AfterValidator
from rio_tiler.colormap import cmap as default_cmap
from rio_tiler.errors import MissingAssets
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from titiler.core.dependencies import AssetsExprParams, ImageRenderingParams, _parse_asset
from titiler.core.dependencies import ColorMapParams as TitilerColorMapParams
from titiler.pgstac.dependencies import ItemIdParams, PgSTACParams
from titiler.pgstac.reader import PgSTACReader

from tiler.external import ExternalItems
from tiler.presets import PansharpenSpec, PresetContext, Resolved, band_layout, item_context, stretch_by_band
from tiler.presets import get as get_preset
from tiler.settings import CogSettings, GdalSettings
from tiler.tms import supported_tms
from tiler.urls import refuse_redirects, validate_dataset_url

# --------------------------------------------------------------------------- inline dependencies

#: Sync dependencies called on the event loop (`runs_inline`), by identity.
_INLINE: set[Any] = set()
#: titiler's modules whose dependencies all only parse the request.
_INLINE_MODULES = {"titiler.core.dependencies"}
#: ... and single ones elsewhere, by (module, qualified name).
_INLINE_NAMES = {
    ("titiler.core.algorithm", "Algorithms.dependency.<locals>.post_process"),
    ("titiler.mosaic.factory", "PixelSelectionParams"),
    ("titiler.pgstac.dependencies", "BackendParams"),
}


def runs_inline(dependency: Any) -> Any:
    """Have FastAPI call the sync ``dependency`` on the event loop instead of its thread pool.

    Only for dependencies that parse the request and nothing more: no database, file or
    network access, nothing that waits. Returns ``dependency`` (usable as a decorator).
    """
    _INLINE.add(dependency)
    return dependency


def is_inline(call: Any) -> bool:
    """True for the dependencies `runs_inline` marked and titiler's parsing-only ones."""
    call = call.func if isinstance(call, partial) else call
    try:
        if call in _INLINE:
            return True
    except TypeError:  # unhashable callable
        return False
    module = getattr(call, "__module__", None)
    return module in _INLINE_MODULES or (module, getattr(call, "__qualname__", None)) in _INLINE_NAMES


async def run_dependency(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """FastAPI's call of a sync dependency: on the event loop if `is_inline`, else in the pool."""
    if is_inline(func):
        return func(*args, **kwargs)
    return await run_in_threadpool(func, *args, **kwargs)


def install_inline_dependencies() -> None:
    """Route FastAPI's sync-dependency calls through `run_dependency` (idempotent).

    FastAPI looks ``run_in_threadpool`` up in ``fastapi.dependencies.utils`` for each sync
    dependency it solves (endpoints have their own call, unchanged).
    """
    import fastapi.dependencies.utils as fastapi_dependencies

    fastapi_dependencies.run_in_threadpool = run_dependency


def cog_url_dependency(settings: CogSettings) -> Callable[..., str]:
    """Path dependency for ``/cog`` endpoints, bound to the allow-list in ``settings``."""
    prefixes = tuple(settings.allowed_prefixes)

    def DatasetURL(  # noqa: N802 - titiler naming
        url: Annotated[
            str,
            Query(
                description="URL of a Cloud Optimized GeoTIFF under one of the allowed prefixes.",
                openapi_examples={"cog": {"value": "https://data.example.org/cogs/scene.tif"}},
            ),
        ],
    ) -> str:
        url = validate_dataset_url(url, prefixes)
        refuse_redirects(url)
        return url

    return DatasetURL


def external_item_dependency(items: ExternalItems) -> Callable[..., pystac.Item]:
    """Path dependency for ``/external`` endpoints: the checked item at ``url`` (`tiler.external`).

    The item is kept on ``request.state`` (``external_item`` for the presets, ``stac_item``
    for the WMTS bounding boxes), as `ItemParams` does for pgstac items.
    """

    def ExternalItemURL(  # noqa: N802 - titiler naming
        request: Request,
        url: Annotated[
            str,
            Query(
                description=(
                    "URL of a STAC item of an allowed catalogue; the item and each of its asset hrefs "
                    "must be under `TILER_EXTERNAL_ALLOWED_PREFIXES`."
                ),
                openapi_examples={
                    "item": {"value": "https://catalogue.example.org/stac/collections/pleiades/items/scene-1"}
                },
            ),
        ],
    ) -> pystac.Item:
        item = items.get(url)
        request.state.stac_item = request.state.external_item = item
        return item

    return ExternalItemURL


def gdal_env_dependency(settings: GdalSettings) -> Callable[[], dict[str, str | int]]:
    """Environment dependency returning the GDAL options used for every read."""
    options = settings.env_options()  # GDAL_CACHEMAX: once per process (configure_process)

    def environment() -> dict[str, str | int]:
        return dict(options)

    return runs_inline(environment)


@runs_inline
def ItemParams(  # noqa: N802 - titiler naming
    request: Request, item: Annotated[pystac.Item, Depends(ItemIdParams)]
) -> pystac.Item:
    """The pgstac item (titiler-pgstac's ``ItemIdParams``), also kept on ``request.state``.

    ``native_extent`` reads it back so that WMTS layers get a BoundingBox
    projected from the item's own CRS rather than from its WGS84 envelope.
    """
    request.state.stac_item = item
    return item


def AssetIdParams(  # noqa: N802 - titiler naming
    request: Request,
    collection_id: Annotated[str, Path(description="STAC Collection Identifier")],
    item_id: Annotated[str, Path(description="STAC Item Identifier")],
    asset_id: Annotated[str, Path(description="STAC Asset Identifier")],
) -> str:
    """Href of one asset of a pgstac item; 404 when the item or asset does not exist."""
    return request.app.state.catalogue.asset(collection_id, item_id, asset_id).href


# --------------------------------------------------------------------------- presets


#: Fields of the items a mosaic reads: titiler-pgstac's, plus what pansharpening needs.
class _Fields(dict):
    """A JSON object that is also hashable (titiler-pgstac caches ``get_assets`` by its kwargs)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


MOSAIC_ITEM_FIELDS = _Fields(include=["assets", "id", "bbox", "collection", "properties.platform"])


@runs_inline
@dataclass
class MosaicAssetsParams(PgSTACParams):
    """titiler-pgstac's item lookup options; items also carry ``properties.platform``."""

    fields: dict = field(init=False, default_factory=lambda: MOSAIC_ITEM_FIELDS)


def preset_context(request: Request) -> PresetContext:
    """Presets of the item, collection or search in the request path (pgstac lookups cached)."""
    external = getattr(request.state, "external_item", None)
    if external is not None:  # an item of another catalogue: its own renders and the built-in presets
        return item_context(external)
    params = request.path_params
    return request.app.state.catalogue.presets(
        collection_id=params.get("collection_id"),
        item=getattr(request.state, "stac_item", None),
        item_id=params.get("item_id"),
        search_id=params.get("search_id"),
    )


def below_cheap_zoom(request: Request, ctx: PresetContext) -> bool:
    """A tile request at a zoom below the data's minzoom (where the COGs' overviews run out)."""
    params = request.path_params
    if "z" not in params or "tileMatrixSetId" not in params:
        return False
    try:
        tms = supported_tms.get(params["tileMatrixSetId"])
        z = int(params["z"])
    except (KeyError, ValueError, InvalidIdentifier):
        return False
    if ctx.item is not None:
        with PgSTACReader(ctx.item, tms=tms) as src:
            minzoom = src.minzoom
    else:
        zooms = request.app.state.catalogue.zooms(ctx.collections, tms)
        if zooms is None:
            return False
        minzoom = zooms[0]
    return z < minzoom


def resolve_preset(request: Request, name: str | None) -> Resolved | None:
    """``name`` (or the default preset) resolved for the data of this request; None if none applies."""
    ctx = preset_context(request)
    if name is None:
        available = ctx.available
        if not available:
            return None
        preset = next(iter(available.values()))
    else:
        preset = get_preset(ctx.presets, name)
    layout = ctx.layout
    resolved = preset.resolve(layout)
    if ctx.quicklook and not preset.assets and below_cheap_zoom(request, ctx):
        # at small scales read the quicklook instead, for the presets it can show
        ql_layout = band_layout({ctx.quicklook: ctx.assets[ctx.quicklook]})
        if preset.applies_to(ql_layout) and preset.pansharpen is None:
            layout, resolved = ql_layout, preset.resolve(ql_layout)
    if resolved.rescale is None and resolved.output_bands:
        # a preset is a picture: 8-bit, with the item's stretch, or one stretch for a mosaic
        stretch = (
            stretch_by_band([ctx.assets], layout)
            if not ctx.mosaic
            else request.app.state.catalogue.stretch(ctx.collections, layout)
        )
        if stretch and all(b in stretch for b in resolved.output_bands):
            resolved = replace(resolved, rescale=tuple(stretch[b] for b in resolved.output_bands))
    return resolved


_EXPLICIT_LAYER = {"assets", "expression"}


async def PresetParams(  # noqa: N802 - titiler naming
    request: Request,
    preset: Annotated[
        str | None,
        Query(
            description=(
                "Band preset (see `/presets` of the collection or item): natural, false-color, ndvi, "
                "panchromatic, pansharpened, or a STAC render of the collection. Explicit parameters "
                "(`assets`, `expression`, `rescale`, `colormap_name`...) override the preset's. "
                "Default: the first preset the data has (natural colour)."
            ),
            openapi_examples={"natural": {"value": "natural"}, "ndvi": {"value": "ndvi"}},
        ),
    ] = None,
) -> Resolved | None:
    """The preset of this request, resolved (None when ``assets``/``expression`` say it all).

    Resolving may read the catalogue: that part runs in the thread pool.
    """
    if preset is None and _EXPLICIT_LAYER & request.query_params.keys():
        return None
    return await run_in_threadpool(resolve_preset, request, preset)


@dataclass
@runs_inline
class LayerParams(AssetsExprParams):
    """``assets``/``expression`` (titiler's), filled from the preset when neither is given."""

    assets: Annotated[  # type: ignore[assignment]
        list[str] | None,
        AfterValidator(lambda v: _parse_asset(v) if v else v),
        Query(
            title="Asset names",
            description="Assets to read, e.g. `ms|bands=nir,red,green` or `ms|bidx=4,3,2`. Default: the preset's.",
        ),
    ] = None
    # the same `preset` query parameter as `PresetParams` (documented there): titiler's WMTS
    # extension checks a layer's query string against this class alone, without sub-dependencies
    preset: Annotated[str | None, Query(include_in_schema=False)] = None
    preset_values: Annotated[Resolved | None, Depends(PresetParams)] = None
    pansharpen: PansharpenSpec | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        """Take the preset's bands unless ``assets`` or ``expression`` were given.

        With neither and no preset (none applies to the data, or titiler's WMTS extension
        checking a layer with no query parameters), there is nothing to read: 400.
        """
        p = self.preset_values
        if p is None and not (self.assets or self.expression or self.preset):
            raise MissingAssets("Give `preset`, `assets` or `expression` (no preset applies to this data)")
        if p is not None and not self.assets and not self.expression:
            self.assets = _parse_asset(list(p.assets)) if p.assets else []
            self.expression = p.expression
            self.pansharpen = p.pansharpen

    def as_dict(self, exclude_none: bool = True) -> dict:
        """Reader options (without the preset itself)."""
        out = super().as_dict(exclude_none)
        out.pop("preset_values", None)
        out.pop("preset", None)
        return out


@runs_inline
@dataclass
class RenderParams(ImageRenderingParams):
    """titiler's rendering options; ``rescale`` and ``color_formula`` default to the preset's."""

    preset_values: Annotated[Resolved | None, Depends(PresetParams)] = None

    def __post_init__(self) -> None:
        """Parse, then take the preset's values where the request gave none."""
        super().__post_init__()
        p = self.preset_values
        if p is not None:
            if not self.rescale and p.rescale:
                self.rescale = [tuple(r) for r in p.rescale]  # type: ignore[assignment]
            if not self.color_formula and p.color_formula:
                self.color_formula = p.color_formula

    def as_dict(self, exclude_none: bool = True) -> dict:
        """Render options (without the preset itself)."""
        out = super().as_dict(exclude_none)
        out.pop("preset_values", None)
        return out


@runs_inline
def ColorMapParams(  # noqa: N802 - titiler naming
    preset_values: Annotated[Resolved | None, Depends(PresetParams)],
    colormap: Annotated[Any, Depends(TitilerColorMapParams)],
) -> Any:
    """Titiler's ``colormap_name``/``colormap``, else the preset's colormap."""
    if colormap is not None or preset_values is None:
        return colormap
    if preset_values.colormap_name:
        return default_cmap.get(preset_values.colormap_name)
    if preset_values.colormap:
        return TitilerColorMapParams(colormap_name=None, colormap=preset_values.colormap)
    return None
