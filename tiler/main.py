"""Application factory: composes titiler and titiler-pgstac factories.

``create_app(settings)`` builds an app; ``app`` (for ``uvicorn tiler.main:app``)
is built lazily from the environment on first access.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

import jinja2
import rasterio
from fastapi import APIRouter, Depends, FastAPI, Query
from pydantic import ValidationError
from rio_tiler.profiles import img_profiles
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette_cramjam.middleware import CompressionMiddleware
from titiler.core import __version__ as titiler_version
from titiler.core.factory import (
    AlgorithmFactory,
    ColorMapFactory,
    MultiBaseTilerFactory,
    TilerFactory,
    TMSFactory,
)
from titiler.core.middleware import TotalTimeMiddleware
from titiler.core.models.OGC import Conformance, Landing
from titiler.core.resources.enums import MediaType, OptionalHeader
from titiler.core.utils import accept_media_type, create_html_response, update_openapi
from titiler.extensions import stacRenderExtension, wmtsExtension
from titiler.mosaic.extensions.wmts import wmtsExtension as mosaicWmtsExtension
from titiler.pgstac import __version__ as titiler_pgstac_version
from titiler.pgstac.dependencies import CollectionIdParams, SearchIdParams
from titiler.pgstac.extensions import searchInfoExtension
from titiler.pgstac.factory import (
    MosaicTilerFactory,
    add_search_list_route,
    add_search_register_route,
)

from tiler import __version__, datasets
from tiler.access import Authenticator, UrlTokenMiddleware, auth_router, authorize, restricted_search_params
from tiler.cache import CachedRoute, CachePolicyMiddleware, TileCache
from tiler.concurrency import RenderLimiter, render_slot
from tiler.db import connection_budget, database_ok, open_pool, pgstac_version
from tiler.deadline import DeadlineMiddleware
from tiler.dependencies import (
    AssetIdParams,
    ColorMapParams,
    ItemParams,
    LayerParams,
    PresetContext,
    RenderParams,
    cog_url_dependency,
    gdal_env_dependency,
    native_extent,
    presets_for,
    search_collection_ids,
)
from tiler.errors import register_error_handlers
from tiler.factory import mosaicThumbnailExtension, thumbnailExtension
from tiler.limits import BodyLimitMiddleware, limits_dependency, mosaic_params, part_params, preview_params
from tiler.logs import configure_logging, redact_library_logs
from tiler.metrics import ORIGIN, ObservabilityMiddleware, metrics_router
from tiler.reader import ItemReader, MosaicBackend, MosaicItemReader
from tiler.readiness import StorageProbe
from tiler.routes import catalogue_router, presets_router
from tiler.settings import Settings, TileCacheSettings
from tiler.stac import MOUNT as STAC_MOUNT
from tiler.stac import MountedLinks, close_stac, open_stac, stac_app
from tiler.stream import IdentityEncoding, StreamLimiter, UpstreamClient, stream_router
from tiler.tms import bbox_in_tms, supported_tms
from tiler.upstream import (
    SigningReader,
    install,
    load_credentials,
    set_signers,
    uninstall,
)

logger = logging.getLogger(__name__)

HERE = FsPath(__file__).parent

NOT_CACHED = {
    r"^/healthz",
    r"^/livez",
    r"^/readyz",
    r"^/searches/?$",
    r"^/searches/list",
    r"^/searches/register",
    r"^/auth/",
}


def _templates() -> Jinja2Templates:
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


def _preset_layers(ctx: PresetContext) -> dict[str, dict[str, Any]]:
    """One WMTS layer per preset the data has: ``?preset=<name>``, zooms from ``minmax_zoom``."""
    layers: dict[str, dict[str, Any]] = {}
    for name, preset in ctx.available.items():
        values: dict[str, Any] = {"preset": name}
        if preset.minmax_zoom:
            values["tilematrixsets"] = {"*": preset.minmax_zoom}
        layers[name] = values
    return layers


def _renders_from_search(src: Any) -> dict:
    """WMTS layers of a mosaic (``src``: titiler-pgstac's backend): its collections' presets."""
    return _preset_layers(presets_for(src.pool, search_id=src.input))


def _tile_cache(cache: TileCacheSettings) -> TileCache:
    """The in-process tile cache, in front of the shared Redis when ``TILER_CACHE_REDIS_URL`` is set."""
    max_entry_bytes = int(cache.max_entry_kb * 1024)
    shared = None
    if cache.redis_url is not None:
        from tiler.rediscache import RedisTileStore  # the `redis` extra, only when asked for

        shared = RedisTileStore(
            cache.redis_url.get_secret_value(),
            prefix=cache.redis_prefix,
            ttl=cache.ttl,
            timeout=cache.redis_timeout,
            backoff=cache.redis_backoff,
            max_entry_bytes=max_entry_bytes,
        )
        logger.info("tile cache: in-process, then shared Redis at %s", shared.where)
    return TileCache(
        max_bytes=int(cache.max_mb * 1024 * 1024),
        ttl=cache.ttl,
        max_entry_bytes=max_entry_bytes,
        shared=shared,
    )


def create_app(settings: Settings | None = None) -> FastAPI:  # noqa: C901
    """Build the FastAPI application for ``settings`` (from the environment by default)."""
    settings = settings or Settings()
    settings.check_deadlines()
    api = settings.api
    obs = settings.observability
    configure_logging(fmt=obs.log_format, if_unconfigured=True)  # e.g. under gunicorn
    if obs.metrics_enabled:
        ORIGIN.enable()
    templates = _templates()
    env_dep = gdal_env_dependency(settings.gdal)
    datasets.limit_malloc_arenas(settings.reader.malloc_arena_max)
    datasets.configure(settings.reader.pool_size, settings.reader.pool_per_file, settings.reader.pool_ttl)
    # titiler's render_image lets rio-tiler's profile win over per-call options: set the level there
    img_profiles.data["png"]["zlevel"] = settings.reader.png_zlevel
    credentials = load_credentials(settings.upstream.credentials_file)
    if settings.cog.enabled:
        for cred in credentials:
            for prefix in settings.cog.allowed_prefixes:
                if cred.prefix.startswith(prefix) or prefix.startswith(cred.prefix):
                    raise ValueError(
                        f"TILER_COG_ALLOWED_PREFIXES entry {prefix!r} overlaps an upstream credential prefix: "
                        "/cog?url= would read protected data with the server's credentials"
                    )

    stac: FastAPI | None = None  # the STAC API, built below once the app exists (its guard reads app.state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.dbpool = open_pool(settings.db, statement_timeout=api.request_timeout)
        stac_conn = settings.stac.max_conn if settings.stac.enabled else 0
        problem = connection_budget(app.state.dbpool, settings.db, stac_conn=stac_conn)
        if problem and settings.db.strict_budget:
            app.state.dbpool.close()
            raise RuntimeError(f"refusing to start (TILER_DB_STRICT_BUDGET): {problem}")
        if problem:
            logger.warning("database connection budget exceeded: %s", problem)
        install(credentials)
        set_signers(credentials)
        if app.state.auth is not None:
            app.state.auth.revoked.ensure_schema()
        if stac is not None:
            await open_stac(stac, settings)
        try:
            yield
        finally:
            if stac is not None:
                await close_stac(stac)
            await app.state.stream_upstream.aclose()
            uninstall(credentials)
            datasets.POOL.clear()
            app.state.dbpool.close()
            if app.state.tile_cache is not None and app.state.tile_cache.shared is not None:
                app.state.tile_cache.shared.close()

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
        lifespan=lifespan,
        # caps first (a refused request reaches neither pgstac nor a reader), then the rights
        # (a caller the policy refuses never waits for a render slot), then the render slot
        dependencies=[
            Depends(limits_dependency(settings.limits)),
            Depends(authorize),
            Depends(render_slot, scope="function"),
        ],
    )
    app.state.render_limiter = RenderLimiter(api.max_renders, api.render_queue, api.queue_timeout)
    app.state.stream_limiter = StreamLimiter(settings.stream.max_per_user, settings.stream.max_total)
    app.state.stream_upstream = UpstreamClient(settings.stream)

    def renders_from_item(src: Any) -> dict:
        """WMTS layers of an item (``src``: `ItemReader`): its presets."""
        item = src.item
        return _preset_layers(
            presets_for(app.state.dbpool, collection_id=item.collection_id, item_id=item.id, item=item)
        )

    stac = stac_app(settings, app) if settings.stac.enabled else None
    app.state.tile_cache = _tile_cache(settings.cache) if settings.cache.enabled else None
    app.state.auth = Authenticator(settings.auth, lambda: app.state.dbpool) if settings.auth.enabled else None
    update_openapi(app)
    register_error_handlers(app)
    redact_library_logs()
    app.add_exception_handler(
        ValidationError,
        lambda request, exc: JSONResponse(
            {"detail": exc.errors(include_url=False, include_context=False)}, status_code=422
        ),
    )

    # innermost: the 504 still goes through CORS, cache policy and compression
    app.state.late_requests = set()  # requests answered 504 whose render still runs
    app.add_middleware(DeadlineMiddleware, timeout=api.request_timeout, abandoned=app.state.late_requests)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.limits.max_body_bytes,
        max_depth=settings.limits.max_body_depth,
    )
    if api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=api.cors_origins,
            allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(
        CompressionMiddleware,
        exclude_mediatype={"image/jpeg", "image/jpg", "image/png", "image/jp2", "image/webp", "image/tiff"},
    )
    app.add_middleware(IdentityEncoding)  # raw file bytes are never compressed
    app.add_middleware(
        CachePolicyMiddleware,
        public=api.cachecontrol,
        private=settings.auth.private_cachecontrol,
        exclude=NOT_CACHED,
    )
    app.add_middleware(TotalTimeMiddleware)
    app.add_middleware(ObservabilityMiddleware)  # inside UrlTokenMiddleware: sees the routed scope
    app.add_middleware(UrlTokenMiddleware)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    conforms_to: set[str] = {
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/landing-page",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/html",
        "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    }

    def collection_layer_id(search_id: str) -> str:
        """WMTS layers of a collection mosaic are named after the collection, not its search hash."""
        return "+".join(search_collection_ids(app.state.dbpool, search_id))

    def mosaic_factory(
        path_dependency, prefix: str, layer_id=lambda search_id: search_id
    ) -> MosaicTilerFactory:
        return MosaicTilerFactory(
            router=APIRouter(route_class=CachedRoute),
            path_dependency=path_dependency,
            router_prefix=prefix,
            backend=MosaicBackend,
            dataset_reader=MosaicItemReader,
            add_statistics=True,
            add_viewer=True,
            add_part=True,
            get_renders=_renders_from_search,
            layer_dependency=LayerParams,
            render_dependency=RenderParams,
            colormap_dependency=ColorMapParams,
            assets_accessor_dependency=mosaic_params(settings.limits),
            img_part_dependency=part_params(settings.limits),
            environment_dependency=env_dep,
            supported_tms=supported_tms,
            optional_headers=[OptionalHeader.server_timing, OptionalHeader.x_assets],
            extensions=[
                searchInfoExtension(),
                mosaicWmtsExtension(templates=templates, layer_identifier_provider=layer_id),
                mosaicThumbnailExtension(),
            ],
            templates=templates,
        )

    # pgstac searches (mosaics of a registered query)
    searches = mosaic_factory(SearchIdParams, "/searches/{search_id}")
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
    conforms_to |= searches.conforms_to

    # collections (mosaic of every item of a collection)
    collections = mosaic_factory(CollectionIdParams, "/collections/{collection_id}", collection_layer_id)
    app.include_router(collections.router, tags=["STAC Collection"], prefix="/collections/{collection_id}")
    conforms_to |= collections.conforms_to

    # single STAC items
    items = MultiBaseTilerFactory(
        router=APIRouter(route_class=CachedRoute),
        reader=ItemReader,
        path_dependency=ItemParams,
        router_prefix="/collections/{collection_id}/items/{item_id}",
        add_viewer=True,
        get_renders=renders_from_item,
        img_part_dependency=part_params(settings.limits),
        img_preview_dependency=preview_params(settings.limits),
        layer_dependency=LayerParams,
        render_dependency=RenderParams,
        colormap_dependency=ColorMapParams,
        environment_dependency=env_dep,
        supported_tms=supported_tms,
        extensions=[
            wmtsExtension(templates=templates, layer_identifier_provider=lambda item: item.id),
            stacRenderExtension(),
            thumbnailExtension(),
        ],
        templates=templates,
    )
    app.include_router(
        items.router, tags=["STAC Item"], prefix="/collections/{collection_id}/items/{item_id}"
    )
    conforms_to |= items.conforms_to

    # single assets of STAC items
    if api.enable_assets_endpoints:
        assets = TilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=SigningReader,
            img_part_dependency=part_params(settings.limits),
            img_preview_dependency=preview_params(settings.limits),
            path_dependency=AssetIdParams,
            router_prefix="/collections/{collection_id}/items/{item_id}/assets/{asset_id}",
            add_viewer=True,
            environment_dependency=env_dep,
            supported_tms=supported_tms,
            extensions=[wmtsExtension(templates=templates)],
            templates=templates,
        )
        app.include_router(
            assets.router,
            tags=["STAC Asset"],
            prefix="/collections/{collection_id}/items/{item_id}/assets/{asset_id}",
        )
        conforms_to |= assets.conforms_to

    # COGs by URL, allow-listed (off by default)
    if settings.cog.enabled:
        cog = TilerFactory(
            router=APIRouter(route_class=CachedRoute),
            reader=SigningReader,
            path_dependency=cog_url_dependency(settings.cog),
            img_part_dependency=part_params(settings.limits),
            img_preview_dependency=preview_params(settings.limits),
            router_prefix="/cog",
            add_viewer=True,
            environment_dependency=env_dep,
            supported_tms=supported_tms,
            extensions=[wmtsExtension(templates=templates)],
            templates=templates,
        )
        app.include_router(cog.router, tags=["Cloud Optimized GeoTIFF"], prefix="/cog")
        conforms_to |= cog.conforms_to

    # raw COG streaming (the STAC API's asset links) and the STAC API itself
    app.include_router(stream_router(settings.stream))
    if stac is not None:
        app.mount(STAC_MOUNT, MountedLinks(stac))

    app.include_router(auth_router())
    if obs.metrics_enabled:
        app.include_router(metrics_router(obs, lambda: getattr(app.state, "dbpool", None)))
    app.include_router(presets_router())
    app.include_router(catalogue_router(templates))

    for factory in (
        TMSFactory(supported_tms=supported_tms, templates=templates),
        AlgorithmFactory(templates=templates),
        ColorMapFactory(templates=templates),
    ):
        app.include_router(factory.router, tags=["Tiling Schemes, Algorithms, Colormaps"])
        conforms_to |= factory.conforms_to

    versions = {
        "dinamis-tiler": __version__,
        "titiler": titiler_version,
        "titiler.pgstac": titiler_pgstac_version,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "proj": rasterio.__proj_version__,
    }

    @app.get("/livez", tags=["Health"], summary="Liveness: the process answers (no I/O).")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get(
        "/healthz",
        tags=["Health"],
        summary="Health: database reachable (1 s ping); versions. 503 when the database is down.",
        responses={503: {"description": "Database unreachable"}},
    )
    def healthz(request: Request) -> JSONResponse:
        pool = request.app.state.dbpool
        ok = database_ok(pool)
        body = {
            "status": "ok" if ok else "unavailable",
            "database_online": ok,
            "pgstac": pgstac_version(pool) if ok else None,
            "versions": versions,
        }
        return JSONResponse(body, status_code=200 if ok else 503, headers={"Cache-Control": "no-store"})

    storage = StorageProbe(api.readiness_probe_urls, api.readiness_probe_timeout, api.readiness_cache_ttl)

    @app.get(
        "/readyz",
        tags=["Health"],
        summary="Readiness: database and COG storage reachable. 503 naming the failed check otherwise.",
        responses={503: {"description": "Database or COG storage unreachable"}},
    )
    def readyz(request: Request) -> JSONResponse:
        db_ok = database_ok(request.app.state.dbpool)
        probes = storage.check()
        failed = (["database"] if not db_ok else []) + (["storage"] if not all(p.ok for p in probes) else [])
        body = {
            "status": "not ready" if failed else "ready",
            "failed": failed,
            "checks": {"database": {"reachable": db_ok}, "storage": [p.as_dict() for p in probes]},
        }
        return JSONResponse(body, status_code=503 if failed else 200, headers={"Cache-Control": "no-store"})

    def _respond(request: Request, f: str | None, data: dict, template: str, title: str):
        if f:
            output = MediaType[f]
        else:
            output = (
                accept_media_type(request.headers.get("accept", ""), [MediaType.html, MediaType.json])
                or MediaType.json
            )
        if output == MediaType.html:
            return create_html_response(request, data, template, title=title, templates=templates)
        return data

    @app.get(
        "/",
        response_model=Landing,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/html": {}, "application/json": {}}}},
        tags=["OGC Common"],
    )
    def landing(
        request: Request,
        f: Annotated[Literal["html", "json"] | None, Query(description="Response format.")] = None,
    ):
        """Landing page: links to the API, collections viewer templates and tiling schemes."""
        base = str(request.base_url).rstrip("/")

        def link(title: str, href: str, rel: str, type_: str, templated: bool = False) -> dict:
            out = {"title": title, "href": href, "rel": rel, "type": type_}
            if templated:
                out["templated"] = True
            return out

        data = {
            "title": api.name,
            "description": "Dynamic tiles for SPOT 6/7 and Pléiades imagery (DINAMIS).",
            "links": [
                link("Landing page", str(request.url_for("landing")), "self", "text/html"),
                link(
                    "API definition (JSON)",
                    str(request.url_for("openapi")),
                    "service-desc",
                    "application/vnd.oai.openapi+json;version=3.0",
                ),
                link(
                    "API documentation", str(request.url_for("swagger_ui_html")), "service-doc", "text/html"
                ),
                link(
                    "Conformance",
                    str(request.url_for("conformance")),
                    "http://www.opengis.net/def/rel/ogc/1.0/conformance",
                    "application/json",
                ),
                link("Viewer: browse collections and items", base + "/viewer", "data", "text/html"),
                link("Collections", base + "/collections", "data", "application/json"),
                link(
                    "WMTS capabilities of the whole catalogue (one QGIS connection)",
                    base + "/WMTSCapabilities.xml",
                    "data",
                    "application/xml",
                ),
                link("Band presets", base + "/presets", "data", "application/json"),
                link(
                    "Registered searches (mosaics)",
                    base + app.url_path_for("list_searches"),
                    "data",
                    "application/json",
                ),
                link(
                    "Collection mosaic viewer",
                    base + "/collections/{collection_id}/WebMercatorQuad/map.html",
                    "data",
                    "text/html",
                    templated=True,
                ),
                link(
                    "Item viewer",
                    base + "/collections/{collection_id}/items/{item_id}/WebMercatorQuad/map.html",
                    "data",
                    "text/html",
                    templated=True,
                ),
                link(
                    "Collection WMTS capabilities",
                    base + "/collections/{collection_id}/WMTSCapabilities.xml",
                    "data",
                    "application/xml",
                    templated=True,
                ),
                link(
                    "Tiling schemes",
                    str(request.url_for("tilematrixsets")),
                    "http://www.opengis.net/def/rel/ogc/1.0/tiling-schemes",
                    "application/json",
                ),
                link("Health", base + "/healthz", "data", "application/json"),
            ],
        }
        return _respond(request, f, data, "landing", api.name)

    @app.get(
        "/conformance",
        response_model=Conformance,
        response_model_exclude_none=True,
        responses={200: {"content": {"text/html": {}, "application/json": {}}}},
        tags=["OGC Common"],
    )
    def conformance(
        request: Request,
        f: Annotated[Literal["html", "json"] | None, Query(description="Response format.")] = None,
    ):
        """OGC conformance classes."""
        return _respond(request, f, {"conformsTo": sorted(conforms_to)}, "conformance", "Conformance")

    return app


def __getattr__(name: str) -> Any:
    """Build ``app`` from the environment on first access (``uvicorn tiler.main:app``)."""
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
