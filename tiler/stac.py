"""The STAC API (stac-fastapi-pgstac) under ``/stac``, behind the tiler's access policy.

stac-fastapi-pgstac serves the catalogue on the same pgstac; this module only narrows what
it shows and rewrites what it hands out:

* `GuardedClient` (a `CoreCrudClient` subclass) restricts every item search (``/search``
  GET/POST, ``/collections/{c}/items``, item fetch) to the collections the caller may see,
  ANDed by pgstac with whatever ``collections``, ``ids`` or CQL2 filter the caller gave,
  and every collection listing to the same ids; a hidden collection is a 404 (the route
  dependency `guard`), exactly like one that does not exist.
* Each returned item's asset ``href`` becomes a link to this server's ``/stream`` route
  carrying a URL token for that user and that item only (``TILER_STAC_ASSET_TOKEN_TTL``),
  so ``pystac_client`` users get links they can paste into QGIS or open with GDAL/rasterio;
  the stored href appears nowhere in the answer. Items also get web-map links (STAC
  web-map-links extension: ``xyz``, ``wmts``, ``tilejson``) to their tiles in the default preset.

Callers authenticate as on the tiles: API key, JWT, or URL token (``/t/<token>/stac/...``).
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlencode

import asyncpg.exceptions as pg
import attr
import pystac
from fastapi import Depends, FastAPI, HTTPException
from stac_fastapi.pgstac.app import instantiate_api
from stac_fastapi.pgstac.config import PostgresSettings
from stac_fastapi.pgstac.config import Settings as StacApiSettings
from stac_fastapi.pgstac.core import CoreCrudClient
from stac_fastapi.pgstac.db import close_db_connection, connect_to_db
from stac_fastapi.pgstac.models.extensions import Extensions
from stac_fastapi.types.errors import NotFoundError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tiler import __version__
from tiler.access import SCOPE_TOKEN, URL_TOKEN_SEGMENT, Authenticator, _mark
from tiler.auth import ANONYMOUS, AuthError, InvalidCredentials, Principal, mint_url_token
from tiler.errors import InvalidFilter, LimitExceeded, _database_error, _failed_query, _refused_query
from tiler.limits import check_filter, check_search_body
from tiler.settings import Settings
from tiler.stream import STREAM_PATH, stream_filename

logger = logging.getLogger(__name__)

MOUNT = "/stac"
WEB_MAP_LINKS = "https://stac-extensions.github.io/web-map-links/v1.2.0/schema.json"
WEB_GRID = "WebMercatorQuad"

#: collection ids the current collection listing is restricted to (None: no restriction)
_listing_ids: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("stac_listing", default=None)


class _Rights:
    """What the caller of one STAC request may see, read from the tiler's app."""

    def __init__(self, auth: Authenticator | None, principal: Principal):
        self.auth, self.principal = auth, principal

    def visible(self, collection_id: str) -> bool:
        return self.may(collection_id, "metadata")

    def may(self, collection_id: str, operation: str) -> bool:
        if self.auth is None:
            return True
        access = self.principal.access(self.auth.policy, collection_id)
        return access is not None and access.allows(operation)


def _rights(request: Request) -> _Rights:
    rights = getattr(request.state, "stac_rights", None)
    if rights is None:  # the guard runs first on every route; never widen by default
        raise HTTPException(403, "Not allowed")
    return rights


async def _collection_ids(request: Request) -> list[str]:
    async with request.app.state.get_connection(request, "r") as conn:
        rows = await conn.fetch("SELECT id FROM pgstac.collections ORDER BY id")
    return [r["id"] for r in rows]


async def _visible_ids(request: Request) -> list[str] | None:
    rights = _rights(request)
    if rights.auth is None:
        return None
    return [c for c in await _collection_ids(request) if rights.visible(c)]


@attr.s
class GuardedClient(CoreCrudClient):
    """stac-fastapi-pgstac's client, narrowed to the caller's collections; asset links signed."""

    async def all_collections(self, request: Request, **kwargs: Any) -> Any:  # type: ignore[override]
        """``GET /collections``: only the collections the caller may see."""
        token = _listing_ids.set(await _visible_ids(request))
        try:
            return await super().all_collections(request, **kwargs)
        finally:
            _listing_ids.reset(token)

    def _clean_search_args(self, base_args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        clean = super()._clean_search_args(base_args, **kwargs)
        ids = _listing_ids.get()
        if ids is not None:  # the collection search of `all_collections`
            clean["ids"] = ids or ["\x00"]  # pgstac ANDs ids with the caller's filter
        return clean

    async def get_collection(self, collection_id: str, request: Request, **kwargs: Any) -> Any:  # type: ignore[override]
        """A hidden collection answers like a missing one."""
        if not _rights(request).visible(collection_id):
            raise NotFoundError(f"Collection {collection_id} does not exist.")
        return await super().get_collection(collection_id, request, **kwargs)

    async def _search_base(self, search_request: Any, request: Request) -> Any:  # type: ignore[override]
        """Every item search: the caller's collections only, then asset links signed."""
        rights = _rights(request)
        allowed = await _visible_ids(request)
        if allowed is not None:
            asked = search_request.collections
            cols = [c for c in asked if c in allowed] if asked else allowed
            if not cols:
                return {"type": "FeatureCollection", "features": [], "links": [], "numberReturned": 0}
            search_request.collections = cols
        cap = request.app.state.tiler_settings.stac.max_items
        if search_request.limit is None or search_request.limit > cap:
            search_request.limit = min(search_request.limit or 10, cap)  # the next link pages on
        result = await super()._search_base(search_request, request)
        await run_in_threadpool(_sign_features, request, rights, result.get("features") or [])
        return result


# --------------------------------------------------------------------------- asset links


def _server_base(request: Request) -> str:
    """The URL of this server (its root path, without the STAC mount or the caller's URL token)."""
    root = request.scope.get("root_path", "").rstrip("/")
    if root.endswith(MOUNT):
        root = root[: -len(MOUNT)]
    token = request.scope.get(SCOPE_TOKEN)
    if token is not None:
        root = root.removesuffix(
            f"/{URL_TOKEN_SEGMENT}/{quote(token, safe='')}"
        )  # as UrlTokenMiddleware set it
    scheme = request.url.scheme
    host = request.headers.get("host") or (request.url.netloc)
    return f"{scheme}://{host}{root}"


def _item_prefix(base: str, rights: _Rights, settings: Any, cid: str, iid: str) -> str:
    """URL prefix for one item's links: with a URL token for this user and item when there is a user."""
    auth, principal = rights.auth, rights.principal
    if auth is None or principal.anonymous or not auth.keys:
        return base
    parent = principal.token
    token, _ = mint_url_token(
        auth.keys,
        sub=principal.user or "",
        groups=principal.groups,
        ttl=settings.asset_token_ttl,
        collections=[cid],
        item=iid,
        max_zoom=parent.max_zoom if parent else None,
        parent=parent.jti if parent else None,
        exp=parent.exp if parent else None,
    )
    return f"{base}/{URL_TOKEN_SEGMENT}/{token}"


def _default_preset(request: Request, feature: dict) -> str | None:
    """The item's first preset (what a tile without ``preset`` shows), None when it has none."""
    try:
        item = pystac.Item.from_dict(feature, preserve_dict=True)
        ctx = request.app.state.tiler.state.catalogue.presets(feature["collection"], feature["id"], item=item)
    except Exception as e:  # noqa: BLE001 - links are a convenience, an odd item keeps its assets
        logger.debug("no presets for STAC item links: %s", type(e).__name__)
        return None
    return next(iter(ctx.available), None)


def _sign_features(request: Request, rights: _Rights, features: list[dict]) -> None:
    settings = request.app.state.tiler_settings.stac
    presets: dict[Any, str | None] = {}  # default preset by collection and asset layout, for this page
    base = _server_base(request)
    for feature in features:
        cid, iid, assets = feature.get("collection"), feature.get("id"), feature.get("assets")
        if not cid or not iid:
            feature.pop("assets", None)  # cannot be linked (fields extension): never the stored href
            continue
        prefix = _item_prefix(base, rights, settings, cid, iid)
        q = {"collection_id": quote(cid, safe=""), "item_id": quote(iid, safe="")}
        for name, asset in (assets or {}).items():
            if not isinstance(asset, dict):
                continue
            asset.pop("alternate", None)  # alternate hrefs are stored hrefs too
            if "href" in asset:
                fname = stream_filename(iid, name, str(asset["href"]), asset.get("type"))
                asset["href"] = prefix + STREAM_PATH.format(
                    **q, asset_id=quote(name, safe=""), filename=quote(fname, safe="")
                )
        if rights.may(cid, "tiles") and isinstance(assets, dict):
            props = feature.get("properties") or {}
            layout = (cid, tuple(sorted(assets)), str(props.get("renders")))
            if layout not in presets:
                presets[layout] = _default_preset(request, feature)
            _add_web_map_links(feature, prefix, q, presets[layout])


def _add_web_map_links(feature: dict, prefix: str, q: dict, preset: str | None) -> None:
    if preset is None:
        return
    item_base = f"{prefix}/collections/{q['collection_id']}/items/{q['item_id']}"
    qs = "?" + urlencode({"preset": preset})
    title = f"{feature['id']} ({preset})"
    links = feature.setdefault("links", [])
    links += [
        {
            "rel": "xyz",
            "href": f"{item_base}/tiles/{WEB_GRID}/{{z}}/{{x}}/{{y}}.png{qs}",
            "type": "image/png",
            "title": f"XYZ tiles: {title}",
        },
        {
            "rel": "tilejson",
            "href": f"{item_base}/{WEB_GRID}/tilejson.json{qs}",
            "type": "application/json",
            "title": f"TileJSON: {title}",
        },
        {
            "rel": "wmts",
            "href": f"{item_base}/WMTSCapabilities.xml",
            "type": "image/png",
            "title": f"WMTS: {title}",
            "wmts:layer": f"{feature['id']}_{WEB_GRID}_{preset}",
        },
    ]
    exts = feature.setdefault("stac_extensions", [])
    if WEB_MAP_LINKS not in exts:
        exts.append(WEB_MAP_LINKS)


# --------------------------------------------------------------------------- the application


def stac_guard(tiler_app: FastAPI, tiler_settings: Settings):
    """Route dependency of every STAC route: the caller, its rights, hidden collections as 404."""

    async def guard(request: Request) -> None:
        auth: Authenticator | None = getattr(tiler_app.state, "auth", None)
        principal = ANONYMOUS
        if auth is not None:
            try:
                principal = await run_in_threadpool(auth.principal, request)
            except InvalidCredentials as e:
                raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from e
            except AuthError as e:
                raise HTTPException(
                    503, "Identity provider unavailable", headers={"Retry-After": "10"}
                ) from e
            tok = principal.token
            if tok is not None and (tok.item is not None or tok.search is not None):
                raise HTTPException(403, "This URL token is limited to one item or search, not the STAC API")
            _mark(request, principal)
        request.state.principal = principal
        rights = _Rights(auth, principal)
        request.state.stac_rights = rights
        cid = request.path_params.get("collection_id")
        if cid is not None and not rights.visible(cid):
            raise NotFoundError(f"Collection {cid} does not exist.")
        await _check_limits(request, tiler_settings.limits)

    return guard


async def _check_limits(request: Request, limits: Any) -> None:
    """The tiler's CQL2 and list caps on STAC searches (query string and POST body): 400 over a cap."""
    q = request.query_params
    try:
        if (f := q.get("filter")) is not None:
            check_filter(limits, f, q.get("filter-lang") or "cql2-text")
        if (query := q.get("query")) is not None:
            check_filter(limits, query, "cql2-json", "query")
        for name in ("ids", "collections"):
            if (v := q.get(name)) is not None and len(v.split(",")) > limits.max_filter_items:
                raise LimitExceeded(
                    f"`{name}` lists {len(v.split(','))} values; the cap is {limits.max_filter_items}"
                )
        if request.method == "POST" and request.headers.get("content-type", "").startswith(
            "application/json"
        ):
            try:
                body = await request.json()
            except ValueError:
                return  # stac-fastapi answers the malformed body itself
            check_search_body(limits, body)
    except (LimitExceeded, InvalidFilter) as e:
        raise HTTPException(400, str(e)) from e


class _DsnSettings(PostgresSettings):
    """stac-fastapi-pgstac's database settings, connecting with the tiler's DSN."""

    dsn: str = ""

    @property
    def connection_string(self) -> str:  # type: ignore[override]
        return self.dsn


class MountedLinks:
    """Make the mounted STAC API build its links under its mount (``/stac``), token included.

    Starlette's ``Mount`` keeps ``app_root_path`` at the parent's root, and
    ``request.base_url`` (stac-fastapi's links) is built from it: without this the
    links would point at the tiler's own ``/collections``.
    """

    def __init__(self, app: FastAPI):
        """Wrap the STAC API application."""
        self.app = app
        self.state = app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Set ``app_root_path`` to the mount's root path."""
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope, app_root_path=scope.get("root_path", ""))
        await self.app(scope, receive, send)


def stac_app(settings: Settings, tiler_app: FastAPI) -> FastAPI:
    """The STAC API application to mount at ``/stac`` (its database pool opens in `open_stac`)."""
    api_settings = StacApiSettings(
        enable_transactions_extensions=False,
        enabled_extensions=None,
        stac_fastapi_title=f"{settings.api.name} STAC API",
        stac_fastapi_description="SPOT 6/7 and Pléiades items (DINAMIS); asset links are signed for the caller.",
        stac_fastapi_landing_id="dinamis-tiler-stac",
        stac_fastapi_version=__version__,
        openapi_url="/api",
        docs_url="/api.html",
        cors_origins=[],
    )
    api = instantiate_api(
        client=GuardedClient,
        extensions=Extensions(settings=api_settings),
        settings=api_settings,
        lifespan=_no_lifespan,
    )
    # the tiler's middleware (CORS, compression, cache policy, metrics, deadlines) wraps the mount
    api.app.user_middleware.clear()
    api.add_route_dependencies([{"path": "*", "method": "*"}], [Depends(stac_guard(tiler_app, settings))])
    api.app.state.tiler = tiler_app
    api.app.state.tiler_settings = settings
    # the catalogue's errors as on the tiler's own routes (asyncpg here, psycopg there)
    for exc in CALLER_ERRORS:
        api.app.add_exception_handler(exc, _refused_query)
    for exc in UNAVAILABLE_ERRORS:
        api.app.add_exception_handler(exc, _database_error)
    api.app.add_exception_handler(pg.PostgresError, _failed_query)
    return api.app


#: asyncpg errors a caller's search causes (bad filter, unknown operator or property): 400
CALLER_ERRORS: tuple[type[Exception], ...] = (
    pg.DataError,
    pg.SyntaxOrAccessError,  # its missing-privilege/table codes are answered 500 by `_refused_query`
    pg.PLPGSQLError,  # pgstac's RAISE on unsupported operators
    pg.IntegrityConstraintViolationError,
    pg.FeatureNotSupportedError,
)
#: the database is down, restarting or saturated: 503 with Retry-After
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    pg.PostgresConnectionError,
    pg.OperatorInterventionError,
    pg.InsufficientResourcesError,
    pg.InterfaceError,
    OSError,
    TimeoutError,
)


@asynccontextmanager
async def _no_lifespan(app: FastAPI):
    yield  # a mounted app's lifespan does not run: the tiler's opens the pool (`open_stac`)


async def open_stac(app: FastAPI, settings: Settings) -> None:
    """Open the STAC API's asyncpg pool (tiler lifespan)."""
    db = settings.db
    pg = _DsnSettings(
        dsn=db.dsn,
        pguser="-",
        pgpassword="-",
        pghost="-",
        pgport=0,
        pgdatabase="-",
        db_min_conn_size=0,  # connect on first use: a database down at start does not stop the server
        db_max_conn_size=settings.stac.max_conn,
    )
    await connect_to_db(app, postgres_settings=pg)


async def close_stac(app: FastAPI) -> None:
    """Close the STAC API's pool."""
    await close_db_connection(app)
