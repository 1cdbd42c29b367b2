"""What each route does, declared where the route is built.

Every route of the application carries exactly one `Operation` among its
dependencies: titiler factories get theirs through ``route_dependencies``
(`factory_operations`), our own routers through ``dependencies=[...]``. As a
dependency an `Operation` does nothing; the application-wide dependencies read
it from the matched route (`declared`):

* rights (`tiler.access.authorize`): which policy operation on which resource;
* caps (`tiler.limits`): which size caps and body checks apply;
* the render slot (`tiler.concurrency`): only pixel-reading routes wait for one;
* ``Cache-Control`` (`tiler.cache.CachePolicyMiddleware`): ``no-store`` where
  an answer must not be kept.

A route without a declaration is refused (403) and fails
``tests/test_service.py::test_every_route_declares_its_operation``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import Depends
from fastapi.params import Depends as DependsParam

#: the policy's operations (`tiler.auth.Access.allows`)
Right = Literal["metadata", "tiles", "preview", "data"]
#: what a route touches, and so how the caller's rights are found:
#: ``public`` (no check), ``account`` (``/auth``: the route checks the caller itself),
#: ``self`` (checks its own credential before any other is parsed: ``/metrics``),
#: ``catalogue`` (lists only what the caller may see), ``collection`` / ``search``
#: (the ``collection_id`` / ``search_id`` path parameter), ``search_pair`` (the ``before`` and
#: ``after`` search ids of ``/compare/searches``: both must pass), ``stream`` (raw bytes of an
#: item's asset), ``searches`` (every registered search), ``register``, ``cog``, ``external``
#: (an item of another STAC catalogue, by URL).
Resource = Literal[
    "public",
    "account",
    "self",
    "catalogue",
    "collection",
    "search",
    "search_pair",
    "stream",
    "searches",
    "register",
    "cog",
    "external",
]
#: which size caps apply (`tiler.settings.LimitSettings`)
Sizes = Literal["preview", "part", "statistics", "thumbnail"]

RENDERING_RIGHTS = frozenset({"tiles", "preview", "data"})


@dataclass(frozen=True)
class Operation:
    """A route's declaration: the right it needs, on what, which caps apply, and whether it may be stored."""

    right: Right = "metadata"
    resource: Resource = "public"
    sizes: Sizes = "preview"
    store: bool = True

    async def __call__(self) -> None:
        """As a dependency, nothing: its place among the route's dependencies is the declaration."""

    @property
    def renders(self) -> bool:
        """True when the route reads pixels (holds a render slot; raw streams are bounded apart)."""
        return self.right in RENDERING_RIGHTS and self.resource != "stream"

    def on(self, resource: Resource) -> Operation:
        """The same operation on another resource."""
        return replace(self, resource=resource)

    def depends(self) -> DependsParam:
        """``Depends(self)``, for ``dependencies=[...]`` of a route or router."""
        return Depends(self)


# what a route does, before its resource is known (titiler's endpoints are the same on every factory)
METADATA = Operation("metadata")
TILES = Operation("tiles")
PREVIEW = Operation("preview")
THUMBNAIL = Operation("preview", sizes="thumbnail")
POINT = Operation("data")
PART = Operation("data", sizes="part")
STATISTICS = Operation("data", sizes="statistics")

# routes of our own routers
PUBLIC = Operation()
HEALTH = Operation(store=False)
ACCOUNT = Operation(resource="account", store=False)
SELF_GUARDED = Operation(resource="self", store=False)
CATALOGUE = Operation(resource="catalogue")
SEARCHES = Operation(resource="searches", store=False)
REGISTER = Operation(resource="register", store=False)
STREAM = Operation("data", resource="stream")
#: AOI exports of an item on its own grid (`tiler.exportapi`): full-resolution pixels, so ``data``
EXPORT = Operation("data", resource="collection", sizes="part")
EXPORT_JOB = Operation("data", resource="collection", sizes="part", store=False)

#: titiler's and titiler-pgstac's endpoints, by what they do (paths relative to the factory's router;
#: ``{y}.{format}`` also matches ``{y}``: a path parameter takes any text without a slash)
TITILER_ENDPOINTS: tuple[tuple[Operation, tuple[str, ...]], ...] = (
    (TILES, ("/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}",)),
    (
        METADATA,
        (
            "/info",
            "/info.geojson",
            "/assets",
            "/tiles",
            "/tiles/{tileMatrixSetId}",
            "/{tileMatrixSetId}/tilejson.json",
            "/{tileMatrixSetId}/map.html",
            "/WMTSCapabilities.xml",
            "/renders",
            "/renders/{render_id}",
            # mosaics: the items under a tile, point or box
            "/tiles/{tileMatrixSetId}/{z}/{x}/{y}/assets",
            "/point/{lon},{lat}/assets",
            "/bbox/{minx},{miny},{maxx},{maxy}/assets",
        ),
    ),
    (PREVIEW, ("/preview", "/preview.{format}", "/preview/{width}x{height}.{format}")),
    (THUMBNAIL, ("/thumbnail.{format}",)),
    (POINT, ("/point/{lon},{lat}",)),
    (
        PART,
        (
            "/bbox/{minx},{miny},{maxx},{maxy}.{format}",
            "/bbox/{minx},{miny},{maxx},{maxy}/{width}x{height}.{format}",
            "/feature",
            "/feature.{format}",
            "/feature/{width}x{height}.{format}",
        ),
    ),
    (STATISTICS, ("/statistics", "/asset_statistics")),
)


def factory_operations(resource: Resource) -> list[tuple[list[Any], list[DependsParam]]]:
    """``route_dependencies`` of a titiler factory whose routes touch ``resource``."""
    return [
        (
            [{"path": path, "method": method} for path in paths for method in ("GET", "POST")],
            [op.on(resource).depends()],
        )
        for op, paths in TITILER_ENDPOINTS
    ]


def declared_all(route: Any) -> list[Operation]:
    """Every `Operation` among ``route``'s dependencies (one for a well-declared route)."""
    return [d.dependency for d in getattr(route, "dependencies", ()) if isinstance(d.dependency, Operation)]


def declared(route: Any) -> Operation | None:
    """The `Operation` a route declares (None: none, or a route that is not an API route)."""
    for d in getattr(route, "dependencies", ()):
        if isinstance(d.dependency, Operation):
            return d.dependency
    return None
