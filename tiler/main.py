"""Application factory: composes titiler and titiler-pgstac factories.

``create_app(settings)`` builds an app; ``app`` (for ``uvicorn tiler.main:app``)
is built lazily from the environment on first access. A tile request flows:
middleware (URL token, metrics, cache policy, CORS, compression, body caps,
deadline) -> application-wide dependencies (caps, rights, render slot; all read
the route's `tiler.operations.Operation`) -> the factory's path dependency (pgstac
lookup, `tiler.dependencies`) -> titiler's endpoint -> reader (`tiler.reader`) ->
error table (`tiler.errors`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles
from starlette_cramjam.middleware import CompressionMiddleware
from titiler.core.factory import (
    AlgorithmFactory,
    ColorMapFactory,
    MultiBaseTilerFactory,
    TilerFactory,
    TMSFactory,
)
from titiler.core.middleware import TotalTimeMiddleware
from titiler.core.resources.enums import OptionalHeader
from titiler.core.routing import add_route_dependencies
from titiler.core.utils import update_openapi
from titiler.extensions import stacRenderExtension, wmtsExtension
from titiler.mosaic.extensions.wmts import wmtsExtension as mosaicWmtsExtension
from titiler.pgstac.dependencies import CollectionIdParams, SearchIdParams
from titiler.pgstac.extensions import searchInfoExtension
from titiler.pgstac.factory import MosaicTilerFactory, add_search_list_route, add_search_register_route

from tiler import __version__
from tiler.access import (
    Authenticator,
    UrlTokenMiddleware,
    auth_router,
    authorize_request,
    restricted_search_params,
)
from tiler.cache import CachedRoute, CachePolicyMiddleware, tile_cache
from tiler.compare import add_compare_routes
from tiler.concurrency import RenderLimiter, render_slot
from tiler.deadline import DeadlineMiddleware
from tiler.dependencies import (
    AssetIdParams,
    ColorMapParams,
    ItemParams,
    LayerParams,
    RenderParams,
    cog_url_dependency,
    external_item_dependency,
    gdal_env_dependency,
)
from tiler.errors import register_error_handlers
from tiler.exportapi import export_router, jobs_router
from tiler.external import ExternalItems
from tiler.factory import mosaicThumbnailExtension, thumbnailExtension
from tiler.health import health_router
from tiler.landing import landing_router
from tiler.lifespan import lifespan
from tiler.limits import BodyLimitMiddleware, limits_dependency, mosaic_params, part_params, preview_params
from tiler.metrics import ObservabilityMiddleware, metrics_router
from tiler.operations import PUBLIC, REGISTER, SEARCHES, factory_operations
from tiler.pages import HERE, external_layers, item_layers, search_layers, templates
from tiler.process import configure_process
from tiler.reader import ExternalItemReader, ItemReader, MosaicBackend, MosaicItemReader
from tiler.routes import catalogue_router, presets_router
from tiler.settings import Settings
from tiler.stac import MOUNT as STAC_MOUNT
from tiler.stac import MountedLinks, stac_app
from tiler.stream import IdentityEncoding, StreamLimiter, UpstreamClient, stream_router
from tiler.tms import supported_tms
from tiler.upstream import SigningReader

#: Items of other STAC catalogues. Not ``/stac/...?url=``: ``/stac`` is the mounted STAC API.
EXTERNAL_PREFIX = "/external"

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/jp2", "image/webp", "image/tiff"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application for ``settings`` (from the environment by default)."""
    settings = settings or Settings()
    api, limits = settings.api, settings.limits
    credentials = configure_process(settings)
    pages = templates()
    env_dep = gdal_env_dependency(settings.gdal)

    # --- the application and its state
    app = FastAPI(
        title=api.name,
        version=__version__,
        description=(
            "Dynamic tiles for SPOT 6/7 and Pléiades imagery catalogued in pgstac: "
            "STAC items and assets, pgstac search and collection mosaics, XYZ, TileJSON, "
            "WMTS and OGC API Tiles."
        ),
        openapi_url="/api",
        docs_url="/api.html",
        root_path=api.root_path,
        lifespan=lifespan(settings, credentials),
        # caps first (a refused request reaches neither pgstac nor a reader), then the rights
        # (a caller the policy refuses never waits for a render slot), then the render slot
        dependencies=[
            Depends(limits_dependency(limits)),
            Depends(authorize_request),
            Depends(render_slot, scope="function"),
        ],
    )
    app.state.render_limiter = RenderLimiter(api.max_renders, api.render_queue, api.queue_timeout)
    app.state.stream_limiter = StreamLimiter(settings.stream.max_per_user, settings.stream.max_total)
    app.state.stream_upstream = UpstreamClient(settings.stream)
    app.state.tile_cache = tile_cache(settings.cache) if settings.cache.enabled else None
    app.state.auth = Authenticator(settings.auth, lambda: app.state.dbpool) if settings.auth.enabled else None
    app.state.stac = stac_app(settings, app) if settings.stac.enabled else None
    app.state.jobs = None
    if settings.jobs.enabled:
        from tiler.jobs import JobQueue  # rq and redis: the `jobs` extra

        app.state.jobs = JobQueue(settings.jobs)
    update_openapi(app)
    register_error_handlers(app)
    app.add_exception_handler(
        ValidationError,
        lambda request, exc: JSONResponse(
            {"detail": exc.errors(include_url=False, include_context=False)}, status_code=422
        ),
    )

    # --- middleware, innermost first: the 504 still goes through CORS, cache policy and compression
    app.state.late_requests = set()  # requests answered 504 whose render still runs
    app.add_middleware(DeadlineMiddleware, timeout=api.request_timeout, abandoned=app.state.late_requests)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, max_depth=limits.max_body_depth)
    if api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=api.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(CompressionMiddleware, exclude_mediatype=IMAGE_TYPES)
    app.add_middleware(IdentityEncoding)  # raw file bytes are never compressed
    app.add_middleware(
        CachePolicyMiddleware, public=api.cachecontrol, private=settings.auth.private_cachecontrol
    )
    app.add_middleware(TotalTimeMiddleware)
    app.add_middleware(ObservabilityMiddleware)  # inside UrlTokenMiddleware: sees the routed scope
    app.add_middleware(UrlTokenMiddleware)

    # --- titiler factories; each route declares its operation (tiler.operations)
    conforms_to: set[str] = set()
    common: dict[str, Any] = {
        "environment_dependency": env_dep,
        "supported_tms": supported_tms,
        "templates": pages,
        "add_viewer": True,
    }
    images = {"img_part_dependency": part_params(limits), "img_preview_dependency": preview_params(limits)}

    def mosaic_factory(path_dependency, prefix: str, resource, layer_id=lambda search_id: search_id):
        return MosaicTilerFactory(
            router=APIRouter(route_class=CachedRoute),
            path_dependency=path_dependency,
            router_prefix=prefix,
            route_dependencies=factory_operations(resource),
            backend=MosaicBackend,
            dataset_reader=MosaicItemReader,
            add_statistics=True,
            add_part=True,
            get_renders=search_layers,
            layer_dependency=LayerParams,
            render_dependency=RenderParams,
            colormap_dependency=ColorMapParams,
            assets_accessor_dependency=mosaic_params(limits),
            img_part_dependency=part_params(limits),
            optional_headers=[OptionalHeader.server_timing, OptionalHeader.x_assets],
            extensions=[
                searchInfoExtension(),
                mosaicWmtsExtension(templates=pages, layer_identifier_provider=layer_id),
                mosaicThumbnailExtension(),
            ],
            **common,
        )

    # pgstac searches (mosaics of a registered query), their list and registration
    searches = mosaic_factory(SearchIdParams, "/searches/{search_id}", "search")
    app.include_router(searches.router, tags=["STAC Search"], prefix="/searches/{search_id}")
    add_search_list_route(app, prefix="/searches", tags=["STAC Search"])
    add_search_register_route(
        app,
        prefix="/searches",
        search_dependency=restricted_search_params,
        tile_dependencies=[
            searches.layer_dependency,
            searches.dataset_dependency,
            searches.pixel_selection_dependency,
            searches.process_dependency,
            searches.render_dependency,
            searches.assets_accessor_dependency,
            searches.reader_dependency,
            searches.backend_dependency,
        ],
        tags=["STAC Search"],
    )
    app_routes = [r for r in app.router.routes if isinstance(r, APIRoute)]
    add_route_dependencies(
        app_routes,
        scopes=[{"path": "/searches/", "method": "GET"}, {"path": "/searches/list", "method": "GET"}],
        dependencies=[SEARCHES.depends()],
    )
    add_route_dependencies(
        app_routes,
        scopes=[{"path": "/searches/register", "method": "POST"}],
        dependencies=[REGISTER.depends()],
    )
    conforms_to |= searches.conforms_to

    # collections (mosaic of every item of a collection), WMTS layers named after the collection
    collections = mosaic_factory(
        CollectionIdParams,
        "/collections/{collection_id}",
        "collection",
        lambda search_id: "+".join(app.state.catalogue.search_collection_ids(search_id)),
    )
    app.include_router(collections.router, tags=["STAC Collection"], prefix="/collections/{collection_id}")
    conforms_to |= collections.conforms_to

    # single STAC items
    items = MultiBaseTilerFactory(
        router=APIRouter(route_class=CachedRoute),
        reader=ItemReader,
        path_dependency=ItemParams,
        router_prefix="/collections/{collection_id}/items/{item_id}",
        route_dependencies=factory_operations("collection"),
        get_renders=item_layers(lambda: app.state.dbpool),
        layer_dependency=LayerParams,
        render_dependency=RenderParams,
        colormap_dependency=ColorMapParams,
        extensions=[
            wmtsExtension(templates=pages, layer_identifier_provider=lambda item: item.id),
            stacRenderExtension(),
            thumbnailExtension(),
        ],
        **images,
        **common,
    )
    app.include_router(
        items.router, tags=["STAC Item"], prefix="/collections/{collection_id}/items/{item_id}"
    )
    conforms_to |= items.conforms_to

    # single assets of STAC items
    if api.enable_assets_endpoints:
        prefix = "/collections/{collection_id}/items/{item_id}/assets/{asset_id}"
        assets = TilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=SigningReader,
            path_dependency=AssetIdParams,
            router_prefix=prefix,
            route_dependencies=factory_operations("collection"),
            extensions=[wmtsExtension(templates=pages)],
            **images,
            **common,
        )
        app.include_router(assets.router, tags=["STAC Asset"], prefix=prefix)
        conforms_to |= assets.conforms_to

    # COGs by URL, allow-listed (off by default)
    if settings.cog.enabled:
        cog = TilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=SigningReader,
            path_dependency=cog_url_dependency(settings.cog),
            router_prefix="/cog",
            route_dependencies=factory_operations("cog"),
            extensions=[wmtsExtension(templates=pages)],
            **images,
            **common,
        )
        app.include_router(cog.router, tags=["Cloud Optimized GeoTIFF"], prefix="/cog")
        conforms_to |= cog.conforms_to

    # two dates compared: two items of a collection, or two searches (tiles, TileJSON, WMTS, viewer)
    conforms_to |= add_compare_routes(app, settings, pages, common)
    # items of other STAC catalogues by URL, allow-listed (off by default); `/stac` is the STAC API
    if settings.external.enabled:
        app.state.external_items = ExternalItems(settings.external)
        external = MultiBaseTilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=ExternalItemReader,
            path_dependency=external_item_dependency(app.state.external_items),
            router_prefix=EXTERNAL_PREFIX,
            route_dependencies=factory_operations("external"),
            get_renders=external_layers,
            layer_dependency=LayerParams,
            render_dependency=RenderParams,
            colormap_dependency=ColorMapParams,
            extensions=[
                wmtsExtension(templates=pages, layer_identifier_provider=lambda item: item.id),
                thumbnailExtension(),
            ],
            **images,
            **common,
        )
        app.include_router(external.router, tags=["STAC Item of another catalogue"], prefix=EXTERNAL_PREFIX)
        conforms_to |= external.conforms_to

    # tiling schemes, algorithms, colour maps: public
    for factory in (
        TMSFactory(
            router=APIRouter(dependencies=[PUBLIC.depends()]), supported_tms=supported_tms, templates=pages
        ),
        AlgorithmFactory(router=APIRouter(dependencies=[PUBLIC.depends()]), templates=pages),
        ColorMapFactory(router=APIRouter(dependencies=[PUBLIC.depends()]), templates=pages),
    ):
        app.include_router(factory.router, tags=["Tiling Schemes, Algorithms, Colormaps"])
        conforms_to |= factory.conforms_to

    # --- our routers: raw COG streaming and the STAC API, access, catalogue, health, landing
    app.include_router(stream_router(settings.stream))
    app.include_router(export_router(settings))
    if app.state.jobs is not None:
        app.include_router(jobs_router(settings))
    if app.state.stac is not None:
        app.mount(STAC_MOUNT, MountedLinks(app.state.stac))
    app.include_router(auth_router())
    if settings.observability.metrics_enabled:
        app.include_router(
            metrics_router(
                settings.observability,
                lambda: getattr(app.state, "dbpool", None),
                lambda: getattr(app.state, "tile_cache", None),
            )
        )
    app.include_router(presets_router())
    app.include_router(catalogue_router(pages))
    app.include_router(health_router(api))
    app.include_router(landing_router(api.name, pages, conforms_to))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def __getattr__(name: str) -> Any:
    """Build ``app`` from the environment on first access (``uvicorn tiler.main:app``)."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
