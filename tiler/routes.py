"""Our own routes (beside titiler's factories): preset listings, catalogue-wide WMTS."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Query
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.templating import Jinja2Templates
from titiler.core.resources.enums import ImageType
from titiler.core.utils import tms_limits

from tiler.access import allowed_collections
from tiler.operations import CATALOGUE, METADATA, PUBLIC
from tiler.presets import Preset, PresetContext, builtin
from tiler.tms import supported_tms

LEGEND_SIZE = {"width": 256, "height": 20}


class _XML(Response):
    media_type = "application/xml"


def _describe(
    request: Request, preset: Preset, base: str | None, default: bool, item: bool
) -> dict[str, Any]:
    out = preset.describe()
    out["default"] = default
    root = str(request.base_url).rstrip("/")
    if preset.colormap_name:
        out["legend"] = {
            "href": f"{root}/colorMaps/{preset.colormap_name}?"
            + urlencode({"f": "png", "orientation": "horizontal", **LEGEND_SIZE}),
            "type": "image/png",
            "colormap_name": preset.colormap_name,
            "min": preset.rescale[0][0] if preset.rescale else None,
            "max": preset.rescale[0][1] if preset.rescale else None,
        }
    if base is not None:
        qs = urlencode({"preset": preset.name})
        links = {
            "tiles": f"{base}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png?{qs}",
            "tilejson": f"{base}/WebMercatorQuad/tilejson.json?{qs}",
            "wmts": f"{base}/WMTSCapabilities.xml",
            "map": f"{base}/WebMercatorQuad/map.html?{qs}",
        }
        if item:
            links["preview"] = f"{base}/preview.png?{qs}"
        out["links"] = links
    return out


def _listing(request: Request, ctx: PresetContext, base: str, item: bool) -> dict[str, Any]:
    available = ctx.available
    default = next(iter(available), None)
    return {
        "bands": ctx.layout,
        "default": default,
        "presets": [_describe(request, p, base, p.name == default, item) for p in available.values()],
        "not_applicable": sorted(set(ctx.presets) - set(available)),
    }


def _visible(request: Request, operation: str = "tiles") -> list[str]:
    visible = allowed_collections(request, operation)
    if visible is None:
        visible = request.app.state.catalogue.collection_ids()
    return visible


MAX_ITEMS_LISTED = 500


def catalogue_router(templates: Jinja2Templates) -> APIRouter:
    """The catalogue as the caller may see it: collections, items, one WMTS document, a viewer."""
    router = APIRouter(tags=["Catalogue"])

    @router.get(
        "/collections",
        summary="Collections the caller may tile, with their extent and links.",
        dependencies=[CATALOGUE.depends()],
    )
    def collections(request: Request) -> dict[str, Any]:
        cat = request.app.state.catalogue
        root = str(request.base_url).rstrip("/")
        out = []
        for cid in _visible(request):
            doc = cat.collection(cid) or {}
            base = f"{root}/collections/{quote(cid, safe='')}"
            out.append(
                {
                    "id": cid,
                    "title": doc.get("title") or cid,
                    "description": doc.get("description"),
                    "extent": doc.get("extent"),
                    "links": {
                        "presets": f"{base}/presets",
                        "items": f"{base}/items",
                        "tilejson": f"{base}/WebMercatorQuad/tilejson.json",
                        "wmts": f"{base}/WMTSCapabilities.xml",
                        "thumbnail": f"{base}/thumbnail.png",
                    },
                }
            )
        return {"collections": out}

    @router.get(
        "/collections/{collection_id}/items",
        summary="Items of a collection, newest first (id, date, platform, bbox), for browsing.",
        dependencies=[METADATA.on("collection").depends()],
    )
    def items(
        request: Request,
        collection_id: str,
        limit: Annotated[int, Query(ge=1, le=MAX_ITEMS_LISTED)] = 100,
        bbox: Annotated[str | None, Query(description="minx,miny,maxx,maxy (WGS84)")] = None,
    ) -> dict[str, Any]:
        query: dict[str, Any] = {
            "collections": [collection_id],
            "limit": limit,
            "sortby": [{"field": "datetime", "direction": "desc"}],
            "fields": {
                "include": [
                    "id",
                    "bbox",
                    "properties.datetime",
                    "properties.platform",
                    "properties.eo:cloud_cover",
                ]
            },
        }
        if bbox:
            try:
                values = [float(v) for v in bbox.split(",")]
            except ValueError:
                values = []
            if len(values) != 4:
                raise HTTPException(400, "bbox must be minx,miny,maxx,maxy")
            query["bbox"] = values
        cat = request.app.state.catalogue
        if cat.collection(collection_id) is None:
            raise HTTPException(404, f"Collection {collection_id!r} not found")
        features = cat.search_items(query)
        root = str(request.base_url).rstrip("/")
        return {
            "collection": collection_id,
            "items": [
                {
                    "id": f["id"],
                    "bbox": f.get("bbox"),
                    **{k: v for k, v in (f.get("properties") or {}).items()},
                    "links": {
                        "thumbnail": f"{root}/collections/{quote(collection_id, safe='')}/items/{quote(f['id'], safe='')}/thumbnail.png",
                    },
                }
                for f in features
            ],
        }

    @router.get(
        "/viewer",
        response_class=HTMLResponse,
        summary="Browse collections and items; presets, grids, URLs.",
        dependencies=[PUBLIC.depends()],
    )
    def viewer(request: Request):
        return templates.TemplateResponse(
            request,
            name="viewer.html",
            context={"root": str(request.base_url).rstrip("/"), "grids": supported_tms.list()},
            media_type="text/html",
        )

    @router.get(
        "/WMTSCapabilities.xml",
        response_class=_XML,
        summary="WMTS capabilities of the whole catalogue: a layer per collection, preset and grid.",
        responses={200: {"content": {"application/xml": {}}}},
        dependencies=[CATALOGUE.depends()],
    )
    def catalogue_wmts(
        request: Request,
        tile_format: Annotated[
            Literal["png", "jpeg", "webp"], Query(description="Tile format of every layer.")
        ] = "png",
        tilematrixsets: Annotated[
            str | None,
            Query(description="Comma-separated grids to list (default: all), e.g. `LAMB93,WebMercatorQuad`."),
        ] = None,
    ):
        cat = request.app.state.catalogue
        grids = supported_tms.list()
        if tilematrixsets:
            wanted = [t.strip() for t in tilematrixsets.split(",") if t.strip()]
            unknown = [t for t in wanted if t not in grids]
            if unknown:
                raise HTTPException(
                    400, f"Unknown TileMatrixSet(s) {', '.join(unknown)}; known: {', '.join(grids)}"
                )
            grids = wanted
        visible = _visible(request)
        principal = getattr(request.state, "principal", None)
        if not visible and principal is not None and principal.anonymous:
            raise HTTPException(401, "Sign in to see collections", headers={"WWW-Authenticate": "Bearer"})
        root = str(request.base_url).rstrip("/")
        layers: list[dict[str, Any]] = []
        for cid in visible:
            doc = cat.collection(cid) or {}
            bbox = ((doc.get("extent") or {}).get("spatial") or {}).get("bbox") or [[-180, -90, 180, 90]]
            bounds = [float(v) for v in bbox[0][:4]]
            available = cat.presets(collection_id=cid).available
            for tms_id in grids:
                tms = supported_tms.get(tms_id)
                zooms = cat.zooms((cid,), tms) or (tms.minzoom, tms.maxzoom)
                for name, preset in available.items():
                    layer_zooms = preset.minmax_zoom or zooms
                    layers.append(
                        {
                            "title": f"{doc.get('title') or cid}: {preset.title} ({tms_id})",
                            "identifier": f"{cid}_{tms_id}_{name}",
                            "tms_identifier": tms_id,
                            "tms_limits": tms_limits(tms, bounds, zooms=layer_zooms),
                            "tiles_url": f"{root}/collections/{quote(cid, safe='')}/tiles/{tms_id}"
                            f"/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{tile_format}",
                            "query_string": urlencode({"preset": name}),
                            "bbox_crs_type": "WGS84BoundingBox",
                            "bbox_crs_uri": "urn:ogc:def:crs:OGC:2:84",
                            "bbox": bounds,
                        }
                    )
        matrix_sets = [
            {"id": t, "crs": supported_tms.get(t).crs.srs, "matrices": supported_tms.get(t).tileMatrices}
            for t in grids
        ]
        return templates.TemplateResponse(
            request,
            name="wmts.xml",
            context={
                "layers": layers,
                "tileMatrixSets": matrix_sets,
                "media_type": ImageType[tile_format].mediatype,
            },
            media_type="application/xml",
        )

    return router


def presets_router() -> APIRouter:
    """``/presets`` (the built-in catalogue) and the presets of each collection, search and item."""
    router = APIRouter(tags=["Presets"])

    @router.get(
        "/presets", summary="The built-in band presets (SPOT 6/7, Pléiades).", dependencies=[PUBLIC.depends()]
    )
    def builtin_presets(request: Request) -> dict[str, Any]:
        return {"presets": [_describe(request, p, None, False, False) for p in builtin().values()]}

    @router.get(
        "/collections/{collection_id}/presets",
        summary="Presets of a collection mosaic: built-in ones its bands allow, and its STAC renders.",
        dependencies=[METADATA.on("collection").depends()],
    )
    def collection_presets(request: Request, collection_id: str) -> dict[str, Any]:
        ctx = request.app.state.catalogue.presets(collection_id=collection_id)
        base = f"{str(request.base_url).rstrip('/')}/collections/{quote(collection_id, safe='')}"
        return {"collection": collection_id, **_listing(request, ctx, base, item=False)}

    @router.get(
        "/searches/{search_id}/presets",
        summary="Presets of a registered search mosaic.",
        dependencies=[METADATA.on("search").depends()],
    )
    def search_presets(request: Request, search_id: str) -> dict[str, Any]:
        ctx = request.app.state.catalogue.presets(search_id=search_id)
        base = f"{str(request.base_url).rstrip('/')}/searches/{quote(search_id, safe='')}"
        return {"search": search_id, **_listing(request, ctx, base, item=False)}

    @router.get(
        "/collections/{collection_id}/items/{item_id}/presets",
        summary="Presets of one item: its collection's, its own renders, and the built-in ones its bands allow.",
        dependencies=[METADATA.on("collection").depends()],
    )
    def item_presets(request: Request, collection_id: str, item_id: str) -> dict[str, Any]:
        ctx = request.app.state.catalogue.presets(collection_id=collection_id, item_id=item_id)
        base = (
            f"{str(request.base_url).rstrip('/')}/collections/{quote(collection_id, safe='')}"
            f"/items/{quote(item_id, safe='')}"
        )
        return {"collection": collection_id, "item": item_id, **_listing(request, ctx, base, item=True)}

    return router
