"""OGC API Common pages: the landing page (``/``) and ``/conformance``, in JSON or HTML."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.requests import Request
from starlette.templating import Jinja2Templates
from titiler.core.models.OGC import Conformance, Landing
from titiler.core.resources.enums import MediaType
from titiler.core.utils import accept_media_type, create_html_response

from tiler.operations import PUBLIC

#: OGC API Common classes of the landing and conformance pages themselves
COMMON_CONFORMANCE = frozenset(
    {
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/landing-page",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/html",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    }
)

_FORMAT = Annotated[Literal["html", "json"] | None, Query(description="Response format.")]


def _link(title: str, href: str, rel: str, type_: str, templated: bool = False) -> dict:
    out = {"title": title, "href": href, "rel": rel, "type": type_}
    if templated:
        out["templated"] = True
    return out


def landing_links(request: Request) -> list[dict]:
    """Links of the landing page: the API, the catalogue, viewers and tiling schemes."""
    base = str(request.base_url).rstrip("/")
    return [
        _link("Landing page", str(request.url_for("landing")), "self", "text/html"),
        _link(
            "API definition (JSON)",
            str(request.url_for("openapi")),
            "service-desc",
            "application/vnd.oai.openapi+json;version=3.0",
        ),
        _link("API documentation", str(request.url_for("swagger_ui_html")), "service-doc", "text/html"),
        _link(
            "Conformance",
            str(request.url_for("conformance")),
            "http://www.opengis.net/def/rel/ogc/1.0/conformance",
            "application/json",
        ),
        _link("Viewer: browse collections and items", base + "/viewer", "data", "text/html"),
        _link("Collections", base + "/collections", "data", "application/json"),
        _link(
            "WMTS capabilities of the whole catalogue (one QGIS connection)",
            base + "/WMTSCapabilities.xml",
            "data",
            "application/xml",
        ),
        _link("Band presets", base + "/presets", "data", "application/json"),
        _link(
            "Registered searches (mosaics)",
            base + request.app.url_path_for("list_searches"),
            "data",
            "application/json",
        ),
        _link(
            "Collection mosaic viewer",
            base + "/collections/{collection_id}/WebMercatorQuad/map.html",
            "data",
            "text/html",
            templated=True,
        ),
        _link(
            "Item viewer",
            base + "/collections/{collection_id}/items/{item_id}/WebMercatorQuad/map.html",
            "data",
            "text/html",
            templated=True,
        ),
        _link(
            "Collection WMTS capabilities",
            base + "/collections/{collection_id}/WMTSCapabilities.xml",
            "data",
            "application/xml",
            templated=True,
        ),
        _link(
            "Tiling schemes",
            str(request.url_for("tilematrixsets")),
            "http://www.opengis.net/def/rel/ogc/1.0/tiling-schemes",
            "application/json",
        ),
        _link("Health", base + "/healthz", "data", "application/json"),
    ]


def landing_router(title: str, templates: Jinja2Templates, conforms_to: Iterable[str]) -> APIRouter:
    """``/`` and ``/conformance``; ``conforms_to``: the classes of every factory of the app."""
    router = APIRouter(tags=["OGC Common"], dependencies=[PUBLIC.depends()])
    classes = sorted(COMMON_CONFORMANCE | set(conforms_to))

    def respond(request: Request, f: str | None, data: dict, template: str, page_title: str):
        if f:
            output = MediaType[f]
        else:
            accept = request.headers.get("accept", "")
            output = accept_media_type(accept, [MediaType.html, MediaType.json]) or MediaType.json
        if output == MediaType.html:
            return create_html_response(request, data, template, title=page_title, templates=templates)
        return data

    @router.get(
        "/",
        response_model=Landing,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/html": {}, "application/json": {}}}},
    )
    def landing(request: Request, f: _FORMAT = None):
        """Landing page: links to the API, collections viewer templates and tiling schemes."""
        data = {
            "title": title,
            "description": "Dynamic tiles for SPOT 6/7 and Pléiades imagery (DINAMIS).",
            "links": landing_links(request),
        }
        return respond(request, f, data, "landing", title)

    @router.get(
        "/conformance",
        response_model=Conformance,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/html": {}, "application/json": {}}}},
    )
    def conformance(request: Request, f: _FORMAT = None):
        """OGC conformance classes."""
        return respond(request, f, {"conformsTo": classes}, "conformance", "Conformance")

    return router
