"""Two dates side by side: tiles of a comparison preset over two items or two registered searches.

A comparison preset (``presets.yaml``, ``kind: difference``) names a single-date preset
(``of: ndvi``); each date resolves it for its own bands, is read through the usual readers
(`tiler.reader.ItemReader`, `tiler.reader.MosaicBackend`: the same signing, credentials and
deadline), and the tile is ``after - before`` in float, band by band, masked where either
date has no data. Picture formats (PNG, JPEG, WebP) are painted with the preset's ``rescale``
and diverging colormap; raw formats (``tif``, ``npy``) keep the float values.

Routes (titiler's tile, TileJSON and WMTS endpoints over `PairReader`):

* ``/compare/collections/{collection_id}/items/{before}/{after}/...``: two items of one
  collection (the ``tiles`` right on the collection);
* ``/compare/searches/{before}/{after}/...``: two registered searches (the ``tiles`` right
  on every collection of both, `tiler.access.authorize`);
* ``/compare/presets``, ``/compare/legend``: the comparison presets and their colour stops;
  ``/compare/viewer``: a swipe between the two dates, and the difference with its legend.
"""

# no `from __future__ import annotations`: FastAPI reads the annotations of the dependencies
# built inside functions below at runtime (as in `tiler.limits`)
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import quote

import attr
import numpy as np
import pystac
from attrs import define
from fastapi import APIRouter, Depends, FastAPI, Path, Query
from morecantile import TileMatrixSet
from rio_tiler.colormap import cmap as default_cmap
from rio_tiler.constants import WEB_MERCATOR_TMS, WGS84_CRS
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import BaseReader
from rio_tiler.models import ImageData, Info
from rio_tiler.utils import CRS_to_uri
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.templating import Jinja2Templates
from titiler.core.dependencies import ColorMapParams as TitilerColorMapParams
from titiler.core.dependencies import DefaultDependency, ImageRenderingParams, _parse_asset
from titiler.core.factory import TilerFactory
from titiler.core.resources.enums import ImageType
from titiler.extensions import wmtsExtension
from titiler.mosaic.factory import MOSAIC_THREADS

from tiler.cache import CachedRoute
from tiler.errors import InvalidComparison, InvalidPreset
from tiler.factory import data_extent
from tiler.limits import mosaic_params
from tiler.operations import PUBLIC, factory_operations
from tiler.presets import Preset, PresetContext, PresetNotApplicable, Resolved, builtin, comparisons
from tiler.reader import ItemReader, MosaicBackend, MosaicItemReader
from tiler.settings import Settings
from tiler.tms import supported_tms

PREFIX = "/compare"
#: formats that keep the difference's float values (no default rescale or colormap)
RAW_FORMATS = {ImageType.tif.value, ImageType.npy.value}
#: colour stops in a legend
LEGEND_STOPS = 11


# --------------------------------------------------------------------------- the two dates


@dataclass(frozen=True)
class Side:
    """One date: an item (``item``) or a registered search mosaic (``item`` None), and its presets."""

    name: str
    presets: PresetContext = field(compare=False)
    item: pystac.Item | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Pair:
    """The two dates of a comparison, and the database pool the mosaics read."""

    before: Side
    after: Side
    pool: Any = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        """``before_after``: the WMTS layer names' prefix."""
        return f"{self.before.name}_{self.after.name}"


BEFORE = Path(description="The earlier date (subtracted).")
AFTER = Path(description="The later date.")


def ItemPairParams(  # noqa: N802 - titiler naming
    request: Request,
    collection_id: Annotated[str, Path(description="STAC Collection Identifier")],
    before: Annotated[str, BEFORE],
    after: Annotated[str, AFTER],
) -> Pair:
    """Two items of one collection; 404 when either does not exist."""
    cat = request.app.state.catalogue

    def side(item_id: str) -> Side:
        item = cat.item(collection_id, item_id)
        return Side(item_id, cat.presets(collection_id=collection_id, item_id=item_id, item=item), item)

    return Pair(side(before), side(after), request.app.state.dbpool)


def SearchPairParams(  # noqa: N802 - titiler naming
    request: Request,
    before: Annotated[str, BEFORE],
    after: Annotated[str, AFTER],
) -> Pair:
    """Two registered searches (their mosaics); 404 when either does not exist."""
    cat = request.app.state.catalogue
    return Pair(
        Side(before, cat.presets(search_id=before)),
        Side(after, cat.presets(search_id=after)),
        request.app.state.dbpool,
    )


# --------------------------------------------------------------------------- the comparison preset


@dataclass(frozen=True)
class Comparison:
    """A comparison preset and the preset it compares, resolved for each date's bands."""

    preset: Preset
    before: Resolved
    after: Resolved


def comparison_preset(name: str | None) -> Preset:
    """A built-in comparison preset by name (the first one by default); 400 for any other name."""
    available = comparisons()
    if name is None:
        return next(iter(available.values()))
    if name not in available:
        kind = "is a single-date preset, not a comparison" if name in builtin() else "is not a preset"
        raise InvalidPreset(f"{name!r} {kind}; comparison presets: {', '.join(available)}")
    return available[name]


def resolve_comparison(preset: Preset, pair: Pair) -> Comparison:
    """Resolve the compared preset for each date (its own bands, its collection's renders)."""

    def side(s: Side, when: str) -> Resolved:
        base = s.presets.presets.get(preset.of or "")
        if base is None or base.is_comparison:
            raise InvalidPreset(
                f"preset {preset.name!r} compares {preset.of!r}, which {s.name!r} does not have"
            )
        try:
            return base.resolve(s.presets.layout)
        except PresetNotApplicable as e:
            raise InvalidPreset(f"preset {preset.name!r} on the {when} date ({s.name}): {e}") from None

    return Comparison(preset, side(pair.before, "before"), side(pair.after, "after"))


_PRESET_QUERY = Query(
    description="Comparison preset (see `/compare/presets`), e.g. `ndvi-change`. Default: the first one.",
    openapi_examples={"ndvi-change": {"value": "ndvi-change"}},
)


@dataclass
class ComparePresetParams(DefaultDependency):
    """The ``preset`` query parameter alone (titiler's WMTS extension checks layers against it)."""

    preset: Annotated[str | None, _PRESET_QUERY] = None

    def __post_init__(self) -> None:
        """Refuse a name that is not a comparison preset."""
        comparison_preset(self.preset)


def ComparisonParams(  # noqa: N802 - titiler naming
    names: Annotated[ComparePresetParams, Depends()],
) -> Preset:
    """The comparison preset of this request."""
    return comparison_preset(names.preset)


def _layer_dependency(path_dependency: Any) -> Any:
    """Layer dependency of a factory: the comparison preset, resolved for the pair of its path."""

    @dataclass(init=False)
    class CompareLayerParams(DefaultDependency):
        comparison: Comparison

        def __init__(
            self,
            preset: Annotated[Preset, Depends(ComparisonParams)],
            pair: Annotated[Pair, Depends(path_dependency)],
        ):
            self.comparison = resolve_comparison(preset, pair)

    return CompareLayerParams


def _picture(request: Request) -> bool:
    """True unless the tile's format keeps raw values (``tif``, ``npy``)."""
    return request.path_params.get("format") not in RAW_FORMATS


def CompareRenderParams(  # noqa: N802 - titiler naming
    request: Request,
    preset: Annotated[Preset, Depends(ComparisonParams)],
    params: Annotated[ImageRenderingParams, Depends()],
) -> ImageRenderingParams:
    """Titiler's rendering options; a picture gets the preset's ``rescale`` unless one is given."""
    if not params.rescale and preset.rescale and _picture(request):
        params.rescale = [tuple(r) for r in preset.rescale]  # type: ignore[assignment]
    return params


def CompareColorMapParams(  # noqa: N802 - titiler naming
    request: Request,
    preset: Annotated[Preset, Depends(ComparisonParams)],
    colormap: Annotated[Any, Depends(TitilerColorMapParams)],
) -> Any:
    """Titiler's ``colormap_name``/``colormap``, else the preset's colormap for a picture."""
    if colormap is not None or not _picture(request):
        return colormap
    return preset_colormap(preset)


def preset_colormap(preset: Preset) -> Any:
    """The colormap of a comparison preset (rio-tiler's by name, or its own JSON), None if none."""
    if preset.colormap_name:
        return default_cmap.get(preset.colormap_name)
    if preset.colormap:
        return TitilerColorMapParams(colormap_name=None, colormap=preset.colormap)
    return None


def mosaic_reader_params(settings: Settings) -> Any:
    """Reader dependency of the search pairs: pgstac's item-search limits, clamped to the caps."""
    limited = mosaic_params(settings.limits)

    @dataclass(init=False)
    class CompareMosaicParams(DefaultDependency):
        search_options: dict

        def __init__(self, options: Annotated[limited, Depends()]):  # type: ignore[valid-type]
            self.search_options = options.as_dict()

    return CompareMosaicParams


# --------------------------------------------------------------------------- the reader


def _layer(resolved: Resolved) -> dict[str, Any]:
    """Reader options of one date (as `tiler.dependencies.LayerParams` gives them)."""
    out: dict[str, Any] = {"assets": _parse_asset(list(resolved.assets)) if resolved.assets else []}
    if resolved.expression:
        out["expression"] = resolved.expression
    if resolved.pansharpen is not None:
        out["pansharpen"] = resolved.pansharpen
    return out


@attr.s
class PairReader(BaseReader):
    """A rio-tiler reader over two dates (`Pair`): its tiles are ``after - before``.

    Its bounds are the intersection of the two dates' (WGS84); its zoom range the finer of
    their minzooms up to the finer of their maxzooms. Each date is read by the readers of the
    item and mosaic endpoints. Only tiles are served: a difference needs a shared pixel grid.
    """

    input: Pair = attr.ib()
    tms: TileMatrixSet = attr.ib(default=WEB_MERCATOR_TMS)
    search_options: dict = attr.ib(factory=dict)

    def __attrs_post_init__(self) -> None:
        """Open both dates (no pixel read) and intersect their bounds."""
        self.crs = WGS84_CRS
        self._dates = (self._open(self.input.before), self._open(self.input.after))
        boxes = [self._extent(side, src) for side, src in zip(self._sides, self._dates, strict=True)]
        west, south = max(b[0] for b in boxes), max(b[1] for b in boxes)
        east, north = min(b[2] for b in boxes), min(b[3] for b in boxes)
        if west >= east or south >= north:
            raise InvalidComparison(
                f"{self.input.before.name!r} and {self.input.after.name!r} do not overlap: nothing to compare"
            )
        self.bounds = (west, south, east, north)

    @property
    def _sides(self) -> tuple[Side, Side]:
        return self.input.before, self.input.after

    def _open(self, side: Side) -> Any:
        if side.item is not None:
            return ItemReader(side.item, tms=self.tms)
        return MosaicBackend(side.name, pool=self.input.pool, tms=self.tms, reader=MosaicItemReader)

    def _extent(self, side: Side, src: Any) -> tuple[float, float, float, float]:
        if side.item is not None:
            return tuple(src.get_geographic_bounds(WGS84_CRS))  # type: ignore[return-value]
        return data_extent(self.input.pool, side.name, src.get_geographic_bounds(WGS84_CRS))

    @property
    def minzoom(self) -> int:  # type: ignore[override]
        """The larger of the two dates' minzooms."""
        return max(src.minzoom for src in self._dates)

    @property
    def maxzoom(self) -> int:  # type: ignore[override]
        """The larger of the two dates' maxzooms."""
        return max(src.maxzoom for src in self._dates)

    def info(self) -> Info:
        """What a tile holds: one float band per band of the compared preset."""
        return Info(
            bounds=self.bounds,
            crs=CRS_to_uri(self.crs) or self.crs.to_wkt(),
            band_metadata=[("b1", {})],
            band_descriptions=[("b1", "after - before")],
            dtype="float32",
            nodata_type="Mask",
        )

    def tile(  # type: ignore[override]
        self, tile_x: int, tile_y: int, tile_z: int, comparison: Comparison | None = None, **kwargs: Any
    ) -> ImageData:
        """``after - before`` over tile x/y/z, float32, masked where either date has no data."""
        if comparison is None:
            raise InvalidComparison("No comparison preset")
        if not self.tile_exists(tile_x, tile_y, tile_z):
            raise TileOutsideBounds(f"Tile {tile_z}/{tile_x}/{tile_y} is outside the area both dates cover.")
        before, after = (
            self._read(src, resolved, tile_x, tile_y, tile_z, kwargs)
            for src, resolved in zip(self._dates, (comparison.before, comparison.after), strict=True)
        )
        if before.count != after.count:
            raise InvalidComparison(
                f"the two dates give {before.count} and {after.count} bands for {comparison.preset.of!r}"
            )
        a, b = after.array.astype("float32"), before.array.astype("float32")
        mask = np.ma.getmaskarray(a) | np.ma.getmaskarray(b)
        diff = np.where(mask, np.float32(0), a.data - b.data).astype("float32")
        name = comparison.preset.name
        return ImageData(
            np.ma.MaskedArray(diff, mask=mask),
            assets=[*(before.assets or []), *(after.assets or [])],
            crs=before.crs,
            bounds=before.bounds,
            band_names=[f"b{i}" for i in range(1, diff.shape[0] + 1)],
            band_descriptions=[name] * diff.shape[0],
            metadata={"before": self.input.before.name, "after": self.input.after.name, "preset": name},
        )

    def _read(self, src: Any, resolved: Resolved, x: int, y: int, z: int, kwargs: dict) -> ImageData:
        options = {**kwargs, **_layer(resolved)}
        if isinstance(src, MosaicBackend):
            image, _ = src.tile(
                x, y, z, search_options=self.search_options, threads=MOSAIC_THREADS, **options
            )
            return image
        return src.tile(x, y, z, **options)

    def _tiles_only(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidComparison("A comparison is served as tiles only")

    statistics = part = preview = point = feature = _tiles_only  # type: ignore[assignment]


# --------------------------------------------------------------------------- factories and routes


@define(kw_only=True)
class CompareTilerFactory(TilerFactory):
    """Titiler's tile and TileJSON endpoints (and extensions) over a `PairReader`."""

    def register_routes(self) -> None:
        """Tiles and TileJSON: the endpoints a difference on a shared tile grid can serve."""
        self.tile()
        self.tilejson()


def comparison_layers(src: PairReader) -> dict[str, dict[str, Any]]:
    """WMTS/TileJSON layers of a pair: each comparison preset both dates can resolve."""
    layers = {}
    for name, preset in comparisons().items():
        try:
            resolve_comparison(preset, src.input)
        except InvalidPreset:
            continue
        layers[name] = {"preset": name}
    return layers


def legend(preset: Preset, stops: int = LEGEND_STOPS) -> dict[str, Any]:
    """Colour stops of a comparison preset: values from its ``rescale`` and the colour a tile gives them.

    A value ``v`` is painted with colormap entry ``floor((clip(v, lo, hi) - lo) / (hi - lo) * 255)``
    (rio-tiler's linear rescale to 8 bits).
    """
    lo, hi = preset.rescale[0] if preset.rescale else (-1.0, 1.0)
    cmap = preset_colormap(preset)
    out: dict[str, Any] = {
        "preset": preset.name,
        "title": preset.title,
        "description": preset.description,
        "kind": preset.kind,
        "of": preset.of,
        "min": lo,
        "max": hi,
        "colormap_name": preset.colormap_name,
    }
    if cmap is None:
        out["stops"] = []
        return out
    table = {int(k): v for k, v in cmap.items()} if isinstance(cmap, dict) else dict(enumerate(cmap))
    values = np.linspace(lo, hi, stops)
    out["stops"] = []
    for v in values:
        index = int(np.floor((np.clip(v, lo, hi) - lo) / (hi - lo) * 255))
        colour = table.get(index, (0, 0, 0, 0))
        out["stops"].append({"value": round(float(v), 6), "color": [int(c) for c in colour]})
    return out


def compare_router(pages: Jinja2Templates) -> APIRouter:
    """``/compare/presets``, ``/compare/legend`` and ``/compare/viewer`` (public: no pixels read)."""
    router = APIRouter(prefix=PREFIX, tags=["Compare two dates"], dependencies=[PUBLIC.depends()])

    @router.get("/presets", summary="The comparison presets (two dates), with their legends.")
    def presets(request: Request) -> dict[str, Any]:
        root = str(request.base_url).rstrip("/")
        return {
            "presets": [
                {
                    **p.describe(),
                    "legend": legend(p),
                    "legend_href": f"{root}{PREFIX}/legend?preset={quote(n)}",
                }
                for n, p in comparisons().items()
            ]
        }

    @router.get("/legend", summary="Colour stops of a comparison preset: value and RGBA colour.")
    def legend_of(preset: Annotated[str | None, _PRESET_QUERY] = None) -> dict[str, Any]:
        return legend(comparison_preset(preset))

    @router.get(
        "/viewer",
        response_class=HTMLResponse,
        summary="Swipe between two dates, or show their difference with its legend.",
    )
    def viewer(
        request: Request,
        grid: Annotated[
            Literal[tuple(supported_tms.list())],  # type: ignore[misc]
            Query(description="TileMatrixSet of the map."),
        ] = "WebMercatorQuad",
    ):
        tms = supported_tms.get(grid)
        return pages.TemplateResponse(
            request,
            name="compare.html",
            context={
                "root": str(request.base_url).rstrip("/"),
                "tms": tms,
                "resolutions": json.dumps([m.cellSize for m in tms]),
            },
            media_type="text/html",
        )

    return router


def add_compare_routes(
    app: FastAPI, settings: Settings, pages: Jinja2Templates, common: dict[str, Any]
) -> set:
    """Include the comparison routers in ``app``; return what they conform to (OGC API Tiles)."""
    conforms_to: set[str] = set()
    for prefix, path_dependency, resource, reader_dependency in (
        (
            f"{PREFIX}/collections/{{collection_id}}/items/{{before}}/{{after}}",
            ItemPairParams,
            "collection",
            DefaultDependency,
        ),
        (
            f"{PREFIX}/searches/{{before}}/{{after}}",
            SearchPairParams,
            "search_pair",
            mosaic_reader_params(settings),
        ),
    ):
        factory = CompareTilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=PairReader,
            reader_dependency=reader_dependency,
            path_dependency=path_dependency,
            router_prefix=prefix,
            route_dependencies=factory_operations(resource),  # type: ignore[arg-type]
            layer_dependency=_layer_dependency(path_dependency),
            render_dependency=CompareRenderParams,  # type: ignore[arg-type]
            colormap_dependency=CompareColorMapParams,
            get_renders=comparison_layers,  # type: ignore[arg-type]
            extensions=[
                wmtsExtension(
                    templates=pages,
                    tile_dependencies=[ComparePresetParams],
                    layer_identifier_provider=lambda pair: pair.label,
                )
            ],
            **common,
        )
        app.include_router(factory.router, tags=["Compare two dates"], prefix=prefix)
        conforms_to |= factory.conforms_to
    app.include_router(compare_router(pages))
    return conforms_to
