"""Our own routes (beside titiler's factories): preset listings."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter
from starlette.requests import Request

from tiler.dependencies import PresetContext, presets_for
from tiler.presets import Preset, builtin

LEGEND_SIZE = {"width": 256, "height": 20}


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


def presets_router() -> APIRouter:
    """``/presets`` (the built-in catalogue) and the presets of each collection, search and item."""
    router = APIRouter(tags=["Presets"])

    @router.get("/presets", summary="The built-in band presets (SPOT 6/7, Pléiades).")
    def catalogue(request: Request) -> dict[str, Any]:
        return {"presets": [_describe(request, p, None, False, False) for p in builtin().values()]}

    @router.get(
        "/collections/{collection_id}/presets",
        summary="Presets of a collection mosaic: built-in ones its bands allow, and its STAC renders.",
    )
    def collection_presets(request: Request, collection_id: str) -> dict[str, Any]:
        ctx = presets_for(request.app.state.dbpool, collection_id=collection_id)
        base = f"{str(request.base_url).rstrip('/')}/collections/{quote(collection_id, safe='')}"
        return {"collection": collection_id, **_listing(request, ctx, base, item=False)}

    @router.get("/searches/{search_id}/presets", summary="Presets of a registered search mosaic.")
    def search_presets(request: Request, search_id: str) -> dict[str, Any]:
        ctx = presets_for(request.app.state.dbpool, search_id=search_id)
        base = f"{str(request.base_url).rstrip('/')}/searches/{quote(search_id, safe='')}"
        return {"search": search_id, **_listing(request, ctx, base, item=False)}

    @router.get(
        "/collections/{collection_id}/items/{item_id}/presets",
        summary="Presets of one item: its collection's, its own renders, and the built-in ones its bands allow.",
    )
    def item_presets(request: Request, collection_id: str, item_id: str) -> dict[str, Any]:
        ctx = presets_for(request.app.state.dbpool, collection_id=collection_id, item_id=item_id)
        base = (
            f"{str(request.base_url).rstrip('/')}/collections/{quote(collection_id, safe='')}"
            f"/items/{quote(item_id, safe='')}"
        )
        return {"collection": collection_id, "item": item_id, **_listing(request, ctx, base, item=True)}

    return router
