"""Access control in the HTTP application: URL tokens, the authorize dependency, /auth routes.

Every route goes through `authorize` (an application-wide dependency): it finds
the caller (`Principal`), reads what the route does (the `tiler.operations.Operation`
it declares: which right, on a collection, a search, ``/cog``...) and checks the
policy for the path's collection or search, zoom and size. A route that declares
nothing is refused: a new endpoint cannot leak by default.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, urlencode

import morecantile
from fastapi import APIRouter, Body, Depends, HTTPException, Query
from psycopg import errors as pg_errors
from pydantic import BaseModel, Field
from starlette._utils import get_route_path
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from titiler.pgstac import model as pgstac_model
from titiler.pgstac.dependencies import SearchParams

from tiler.auth import (
    ANONYMOUS,
    Access,
    ApiKeyStore,
    AuthError,
    InvalidCredentials,
    JwtVerifier,
    Policy,
    Principal,
    ReloadingFile,
    load_document,
    looks_like_url_token,
    mint_url_token,
    verify_url_token,
)
from tiler.operations import ACCOUNT, Operation, declared
from tiler.settings import AuthSettings
from tiler.tms import supported_tms

logger = logging.getLogger(__name__)

URL_TOKEN_SEGMENT = "t"
SCOPE_TOKEN = "dinamis.url_token"
SCOPE_CACHE = "dinamis.cache"

WEB_MERCATOR_CELL_Z0 = 2 * math.pi * 6378137 / 256
METRES_PER_DEGREE = 111_320.0


# --------------------------------------------------------------------------- URL tokens in paths


class UrlTokenMiddleware:
    """Carry a signed URL token in the path, so every URL the server advertises carries it too.

    ``/t/<token>/collections/...`` is served as ``/collections/...`` with
    ``/t/<token>`` added to the ASGI ``root_path``: titiler builds TileJSON
    ``tiles``, WMTS ``ResourceURL`` templates and links from the root path, so
    QGIS and web maps repeat the token on every tile request without being
    told. ``?token=<token>`` is accepted too and moved into the path the same
    way (and removed from the query, so it never reaches titiler's parameters).
    """

    def __init__(self, app: ASGIApp):
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Extract the token before routing."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        rel = get_route_path(scope)
        marker = f"/{URL_TOKEN_SEGMENT}/"
        token = None
        if rel.startswith(marker):
            token, _, rest = rel[len(marker) :].partition("/")
            scope = dict(scope, root_path=f"{root}{marker}{token}")
            if not rest:
                scope["path"] = scope["root_path"] + "/"
        elif b"token=" in scope.get("query_string", b""):
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            tokens = [v for k, v in pairs if k == "token"]
            if tokens:
                token = tokens[-1]
                new_root = f"{root}{marker}{quote(token, safe='')}"
                scope = dict(
                    scope,
                    root_path=new_root,
                    path=new_root + rel,
                    raw_path=(new_root + rel).encode(),
                    query_string=urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1"),
                )
        if token is not None:
            scope[SCOPE_TOKEN] = token
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- revocation


class RevocationList:
    """Revoked URL-token ids, in the database (shared by workers and replicas).

    The set is re-read at most every ``interval`` seconds, so a revocation
    takes effect everywhere within that time. While the database is
    unreachable the last known set is kept.
    """

    DDL = """
        CREATE SCHEMA IF NOT EXISTS tiler_auth;
        CREATE TABLE IF NOT EXISTS tiler_auth.revoked_tokens (
            jti text PRIMARY KEY,
            sub text NOT NULL,
            expires_at timestamptz NOT NULL,
            revoked_at timestamptz NOT NULL DEFAULT now()
        );
    """

    def __init__(self, pool_getter: Callable[[], Any], interval: float = 2.0):
        """``pool_getter`` returns the app's psycopg pool (opened in the lifespan)."""
        self._pool = pool_getter
        self._interval = interval
        self._ids: frozenset[str] = frozenset()
        self._loaded = 0.0
        self._lock = threading.Lock()

    def ensure_schema(self) -> None:
        """Create the table when missing (needs CREATE rights; `tiler migrate` does it too)."""
        try:
            with self._pool().connection() as conn:
                conn.execute(self.DDL)
        except pg_errors.Error as e:
            logger.warning("revocation table unavailable (%s); run `tiler migrate`", e.__class__.__name__)

    def _refresh(self) -> None:
        with self._pool().connection() as conn:
            rows = conn.execute(
                "SELECT jti FROM tiler_auth.revoked_tokens WHERE expires_at > now()"
            ).fetchall()
        self._ids = frozenset(r[0] for r in rows)

    def __call__(self, jti: str) -> bool:
        """True when ``jti`` is revoked."""
        now = time.monotonic()
        if now - self._loaded >= self._interval:
            with self._lock:
                if now - self._loaded >= self._interval:
                    try:
                        self._refresh()
                    except Exception as e:  # database down: keep the last known list
                        logger.warning("revocation list not refreshed: %s", e.__class__.__name__)
                    self._loaded = now
        return jti in self._ids

    def revoke(self, jti: str, sub: str, expires_at: int) -> None:
        """Record ``jti`` as revoked and take it into account at once in this worker."""
        with self._pool().connection() as conn:
            conn.execute(
                "INSERT INTO tiler_auth.revoked_tokens (jti, sub, expires_at) "
                "VALUES (%s, %s, to_timestamp(%s)) ON CONFLICT (jti) DO NOTHING",
                (jti, sub, expires_at),
            )
        with self._lock:
            self._ids = self._ids | {jti}


# --------------------------------------------------------------------------- the authenticator


class Authenticator:
    """Credentials and policy of one application (held in ``app.state.auth``)."""

    def __init__(self, settings: AuthSettings, pool_getter: Callable[[], Any]):
        """Load the policy, key store and JWKS now: a bad file fails the start."""
        self.settings = settings
        self.keys = settings.keys()
        self.policy_file = ReloadingFile(settings.policy_file, Policy.from_mapping, settings.reload_interval)  # type: ignore[arg-type]
        self.api_keys = (
            ReloadingFile(settings.api_keys_file, ApiKeyStore.from_mapping, settings.reload_interval)
            if settings.api_keys_file
            else None
        )
        self.jwt: JwtVerifier | None = None
        if settings.jwks_file or settings.jwks_url:
            self.jwt = JwtVerifier(
                jwks=load_document(settings.jwks_file) if settings.jwks_file else None,
                jwks_url=settings.jwks_url,
                issuer=settings.issuer,
                audience=settings.audience,
                user_claim=settings.user_claim,
                groups_claim=settings.groups_claim,
            )
        self.revoked = RevocationList(pool_getter, settings.reload_interval)

    @property
    def policy(self) -> Policy:
        """The current policy (reloaded when its file changes)."""
        return self.policy_file.get()

    def principal(self, request: Request) -> Principal:
        """The caller: URL token, then Authorization/X-API-Key headers, else anonymous."""
        url_token = request.scope.get(SCOPE_TOKEN)
        if url_token is not None:
            return self._from_url_token(url_token)
        api_key = request.headers.get("x-api-key")
        if api_key:
            return self._from_api_key(api_key)
        auth = request.headers.get("authorization")
        if not auth:
            return ANONYMOUS
        scheme, _, value = auth.partition(" ")
        value = value.strip()
        if scheme.lower() not in ("bearer", "apikey") or not value:
            raise InvalidCredentials("Authorization header must be `Bearer <token>`")
        if scheme.lower() == "apikey":
            return self._from_api_key(value)
        if looks_like_url_token(value):
            return self._from_url_token(value)
        if value.count(".") == 2:
            if self.jwt is None:
                raise InvalidCredentials("This server does not accept JWTs")
            return self.jwt.verify(value)
        return self._from_api_key(value)

    def _from_api_key(self, key: str) -> Principal:
        if self.api_keys is None:
            raise InvalidCredentials("This server does not accept API keys")
        return self.api_keys.get().lookup(key)

    def _from_url_token(self, token: str) -> Principal:
        if not self.keys:
            raise InvalidCredentials("This server does not accept URL tokens")
        tok = verify_url_token(token, self.keys, revoked=self.revoked)
        return Principal(user=tok.sub, groups=frozenset(tok.groups), method="url-token", token=tok)


# --------------------------------------------------------------------------- zoom and size of a request


def _tile_ground_resolution(tms_id: str, z: int, x: int, y: int, out_px: int | None) -> tuple[float, float]:
    """(ground metres per pixel of the requested tile, latitude of its centre)."""
    tms = supported_tms.get(tms_id)
    matrix = tms.matrix(z)
    cell = matrix.cellSize * matrix.tileWidth / (out_px or matrix.tileWidth)
    b = tms.bounds(morecantile.Tile(x, y, z))
    lat = max(-85.0, min(85.0, (b.bottom + b.top) / 2))
    crs = tms.rasterio_crs
    if crs.is_geographic:
        return cell * METRES_PER_DEGREE, lat
    if crs.to_epsg() == 3857:
        return cell * math.cos(math.radians(lat)), lat
    return cell, lat


def zoom_allowed(access: Access, request: Request) -> bool:
    """True when the tile's resolution is not finer than the grant's ``max_zoom``."""
    if access.max_zoom is None:
        return True
    p = request.path_params
    try:
        z, x, y = int(p["z"]), int(p["x"]), int(p["y"])
        size = request.query_params.get("tilesize")
        out_px = int(size) if size else None
        ground, lat = _tile_ground_resolution(p["tileMatrixSetId"], z, x, y, out_px)
    except (KeyError, ValueError, morecantile.errors.InvalidIdentifier, morecantile.errors.InvalidZoomError):
        return True  # malformed: titiler answers 4xx itself, no pixels are read
    limit = WEB_MERCATOR_CELL_Z0 / 2**access.max_zoom * math.cos(math.radians(lat))
    return ground >= limit * 0.99


def preview_allowed(access: Access, request: Request) -> bool:
    """True when the requested preview is within ``max_preview_size``."""
    if access.max_preview_size is None:
        return True
    q, p = request.query_params, request.path_params
    op = declared(request.scope.get("route"))
    if op is not None and op.sizes == "thumbnail":
        size = q.get("size", "256")
        return (int(size) if size.isdigit() else 10**9) <= access.max_preview_size
    sizes = []
    for name in ("width", "height"):
        v = p.get(name) or q.get(name)
        if v:
            sizes.append(int(v) if str(v).isdigit() else 10**9)
    ms = q.get("max_size")
    sizes.append(int(ms) if ms and ms.isdigit() else (10**9 if ms else 1024))
    return max(sizes) <= access.max_preview_size


# --------------------------------------------------------------------------- the dependency


def _deny(principal: Principal, detail: str) -> HTTPException:
    if principal.anonymous:
        return HTTPException(401, "Authentication required", headers={"WWW-Authenticate": "Bearer"})
    return HTTPException(403, detail)


def _check(principal: Principal, access: Access | None, op: Operation, request: Request, what: str) -> None:
    if access is None or not access.allows(op.right):
        raise _deny(principal, f"Not allowed: {op.right} on {what}")
    if op.right == "tiles" and not zoom_allowed(access, request):
        raise _deny(principal, f"Zoom level above what your access allows on {what} (max {access.max_zoom})")
    if op.right == "preview" and not preview_allowed(access, request):
        raise _deny(
            principal, f"Preview larger than your access allows on {what} (max {access.max_preview_size} px)"
        )


def _mark(request: Request, principal: Principal) -> None:
    holder = request.scope.get(SCOPE_CACHE)
    if holder is not None and not principal.anonymous:
        holder["private"] = True


def _check_search(
    principal: Principal, policy: Policy, op: Operation, request: Request, search_id: str
) -> None:
    """``op`` on every collection a registered search reads (all of them for an unrestricted one)."""
    try:
        cols = request.app.state.catalogue.search_restriction(search_id)
    except KeyError:
        raise HTTPException(404, f"SearchId `{search_id}` not found") from None
    if cols is None:
        _check(principal, principal.access(policy, "*"), op, request, "an unrestricted search")
        return
    for c in cols:
        _check(principal, principal.access(policy, c), op, request, f"collection {c!r}")


async def authorize_request(request: Request) -> None:
    """`authorize` as the application-wide dependency, not run at all without access control.

    In the thread pool: it may ask the identity provider.
    """
    if getattr(request.app.state, "auth", None) is not None:
        await run_in_threadpool(authorize, request)


def authorize(request: Request) -> None:
    """Application-wide dependency: find the caller and enforce the policy for the route's `Operation`."""
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None:  # access control disabled
        return
    op = declared(request.scope.get("route"))
    if op is not None and op.resource == "self":
        return
    try:
        principal = auth.principal(request)
    except InvalidCredentials as e:
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from e
    except AuthError as e:
        raise HTTPException(503, "Identity provider unavailable", headers={"Retry-After": "10"}) from e
    request.state.principal = principal
    _mark(request, principal)
    if op is None:  # a route that does not say what it does is never served
        raise HTTPException(403, "Not allowed")
    if op.resource in ("public", "account"):
        return  # /auth routes check the caller themselves
    tok = principal.token
    params = request.path_params
    if (
        tok is not None
        and tok.item is not None
        and (op.resource not in ("collection", "stream") or params.get("item_id") != tok.item)
    ):
        raise HTTPException(403, "This URL token is limited to one item")
    if op.resource == "catalogue":
        return  # lists only what the caller may see
    policy = auth.policy
    if op.resource == "search":
        search_ids = [params.get("search_id")]
    elif op.resource == "search_pair":  # /compare/searches/{before}/{after}: both must pass
        search_ids = [params.get("before"), params.get("after")]
    else:
        search_ids = [None]
    if tok is not None and tok.search is not None and any(s != tok.search for s in search_ids):
        raise HTTPException(403, "This URL token is limited to one search")
    if op.resource in ("collection", "stream") and (collection := params.get("collection_id")):
        _check(principal, principal.access(policy, collection), op, request, f"collection {collection!r}")
        return
    if op.resource in ("search", "search_pair") and all(search_ids):
        for search_id in search_ids:
            _check_search(principal, policy, op, request, search_id)
        return
    if op.resource == "register":
        if tok is not None:
            raise HTTPException(403, "URL tokens cannot register searches")
        return  # restricted_search_params narrows the query itself
    if op.resource == "searches":
        _check(principal, principal.access(policy, "*"), op, request, "the list of all searches")
        return
    if op.resource == "cog":
        if not principal.may_use_cog(policy):
            raise _deny(principal, "Not allowed: /cog")
        return
    if op.resource == "external":
        if not principal.may_use_catalogues(policy):
            raise _deny(
                principal, "Not allowed: items of other catalogues (/external; the policy's `catalogues`)"
            )
        return
    raise HTTPException(403, "Not allowed")


def allowed_collections(request: Request, operation: str = "metadata") -> list[str] | None:
    """Ids of the catalogue's collections the caller may ``operation`` (None: all, access control off)."""
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None:
        return None
    principal: Principal = getattr(request.state, "principal", ANONYMOUS)
    policy = auth.policy
    ids = request.app.state.catalogue.collection_ids()
    return [c for c in ids if (a := principal.access(policy, c)) is not None and a.allows(operation)]


def restricted_search_params(
    request: Request,
    search_query: Annotated[tuple[pgstac_model.PgSTACSearch, pgstac_model.Metadata], Depends(SearchParams)],
) -> tuple[pgstac_model.PgSTACSearch, pgstac_model.Metadata]:
    """Search registration, narrowed to the collections the caller may see.

    The stored query always names its collections; pgstac ANDs them with any
    filter, so no CQL2 expression can widen it, and whoever uses the search
    later must be allowed every one of them.
    """
    search, metadata = search_query
    allowed = allowed_collections(request, "metadata")
    if allowed is None:
        return search, metadata
    principal: Principal = getattr(request.state, "principal", ANONYMOUS)
    asked = list(search.collections or [])
    if asked:
        refused = sorted(set(asked) - set(allowed))
        if refused:
            raise _deny(principal, f"Not allowed: collections {refused}")
        return search, metadata
    if not allowed:
        raise _deny(principal, "No collection is available to you")
    auth: Authenticator = request.app.state.auth
    if principal.access(auth.policy, "*") is not None:
        return search, metadata  # full access: keep the search unrestricted
    search.collections = allowed
    return search, metadata


# --------------------------------------------------------------------------- /auth routes


class TokenRequest(BaseModel):
    """Scope of a new URL token."""

    collections: list[str] | None = Field(
        default=None, description="Collection ids (default: all you may see)."
    )
    search: str | None = Field(default=None, description="Limit the token to one registered search.")
    max_zoom: int | None = Field(
        default=None, ge=0, le=30, description="Highest WebMercatorQuad zoom allowed."
    )
    ttl: int | None = Field(default=None, gt=0, description="Lifetime in seconds (capped by the server).")


class TokenResponse(BaseModel):
    """A minted URL token and how to use it."""

    token: str
    expires_at: int
    token_id: str
    url_prefix: str = Field(description="Prefix to put before any tile server path.")


class RevokeRequest(BaseModel):
    """A token to revoke (your own)."""

    token: str


def _require_user(request: Request) -> tuple[Authenticator, Principal]:
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None:
        raise HTTPException(404, "Access control is disabled on this server")
    principal: Principal = getattr(request.state, "principal", ANONYMOUS)
    if principal.anonymous:
        raise HTTPException(401, "Authentication required", headers={"WWW-Authenticate": "Bearer"})
    if principal.token is not None:
        raise HTTPException(403, "URL tokens cannot mint or revoke tokens; use your API key or JWT")
    if not auth.keys:
        raise HTTPException(501, "URL tokens are not configured (TILER_AUTH_SIGNING_KEYS)")
    return auth, principal


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def mint_for(request: Request, req: TokenRequest) -> TokenResponse:
    """Mint a URL token for the caller, scoped by ``req``."""
    auth, principal = _require_user(request)
    if req.collections is not None:
        for c in req.collections:
            if principal.access(auth.policy, c) is None:
                raise HTTPException(403, f"Not allowed: collection {c!r}")
    if req.search is not None:
        try:
            cols = request.app.state.catalogue.search_restriction(req.search)
        except KeyError:
            raise HTTPException(404, f"SearchId `{req.search}` not found") from None
        for c in cols or ("*",):
            if principal.access(auth.policy, c) is None:
                raise HTTPException(403, "Not allowed: this search covers collections you may not see")
    ttl = min(req.ttl or auth.settings.token_default_ttl, auth.settings.token_max_ttl)
    token, tok = mint_url_token(
        auth.keys,
        sub=principal.user or "",
        groups=principal.groups,
        ttl=ttl,
        collections=req.collections,
        search=req.search,
        max_zoom=req.max_zoom,
    )
    logger.info("minted URL token %s for %s (ttl %ss)", tok.jti, principal.user, ttl)
    return TokenResponse(
        token=token,
        expires_at=tok.exp,
        token_id=tok.jti,
        url_prefix=f"{_base(request)}/{URL_TOKEN_SEGMENT}/{token}",
    )


def auth_router() -> APIRouter:
    """The /auth routes: who am I, mint, QGIS layer URLs, revoke."""
    router = APIRouter(prefix="/auth", tags=["Access"], dependencies=[ACCOUNT.depends()])

    @router.get("/whoami", summary="The caller's identity and the collections it may see.")
    def whoami(request: Request) -> dict[str, Any]:
        principal: Principal = getattr(request.state, "principal", ANONYMOUS)
        return {
            "user": principal.user,
            "method": principal.method,
            "groups": sorted(principal.groups),
            "collections": allowed_collections(request, "metadata"),
            "token_expires_at": principal.token.exp if principal.token else None,
        }

    @router.post(
        "/token", response_model=TokenResponse, summary="Mint a signed URL token (for QGIS, web maps)."
    )
    def token(request: Request, body: Annotated[TokenRequest, Body()]) -> TokenResponse:
        return mint_for(request, body)

    @router.get("/qgis", summary="Ready-to-paste XYZ and WMTS layer URLs for QGIS, with a URL token.")
    def qgis(
        request: Request,
        collection: Annotated[str | None, Query(description="Collection id.")] = None,
        search: Annotated[str | None, Query(description="Registered search id.")] = None,
        tms: Annotated[str, Query(description="TileMatrixSet of the XYZ URL.")] = "WebMercatorQuad",
        preset: Annotated[
            str | None,
            Query(
                description="Band preset of the collection or search (see its `/presets`); default: the first."
            ),
        ] = None,
        ttl: Annotated[int | None, Query(gt=0, description="Token lifetime, seconds.")] = None,
        max_zoom: Annotated[int | None, Query(ge=0, le=30)] = None,
    ) -> dict[str, Any]:
        if (collection is None) == (search is None):
            raise HTTPException(400, "Give exactly one of `collection` or `search`")
        if tms not in supported_tms.list():
            raise HTTPException(400, f"Unknown TileMatrixSet {tms!r}")
        available = request.app.state.catalogue.presets(collection_id=collection, search_id=search).available
        if preset is not None and preset not in available:
            raise HTTPException(400, f"Unknown preset {preset!r}; available: {', '.join(available)}")
        req = TokenRequest(
            collections=[collection] if collection else None, search=search, max_zoom=max_zoom, ttl=ttl
        )
        minted = mint_for(request, req)
        name = preset or next(iter(available), None)
        qs = f"?{urlencode({'preset': name})}" if name else ""
        base = (
            f"{minted.url_prefix}/collections/{quote(collection, safe='')}"
            if collection
            else f"{minted.url_prefix}/searches/{search}"
        )
        return {
            "preset": name,
            "xyz": f"{base}/tiles/{tms}/{{z}}/{{x}}/{{y}}.png{qs}",
            "wmts": f"{base}/WMTSCapabilities.xml",
            "tilejson": f"{base}/{tms}/tilejson.json{qs}",
            "expires_at": minted.expires_at,
            "token_id": minted.token_id,
            "howto": (
                "QGIS: Layer > Add Layer > Add XYZ Layer (New, paste `xyz`), or Add WMS/WMTS Layer "
                "(New, paste `wmts`). No header or password is needed; the URL expires at `expires_at`."
            ),
        }

    @router.post("/revoke", status_code=204, summary="Revoke one of your URL tokens before it expires.")
    def revoke(request: Request, body: Annotated[RevokeRequest, Body()]) -> None:
        auth, principal = _require_user(request)
        try:
            tok = verify_url_token(body.token, auth.keys)  # revoking twice is harmless (ON CONFLICT)
        except InvalidCredentials as e:
            raise HTTPException(400, f"Cannot revoke: {e}") from e
        if tok.sub != principal.user:
            raise HTTPException(403, "You can only revoke your own tokens")
        try:
            auth.revoked.revoke(tok.jti, tok.sub, tok.exp)
        except pg_errors.Error as e:
            raise HTTPException(503, "Revocation store unavailable", headers={"Retry-After": "10"}) from e
        logger.info("revoked URL token %s of %s", tok.jti, tok.sub)
        return None

    return router
