"""Every route declares what it does (`tiler.operations`); rights, caps and the render slot read it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from tests.conftest import make_settings
from tiler.auth import hash_api_key
from tiler.main import create_app
from tiler.operations import METADATA, declared_all
from tiler.settings import ApiSettings, AuthSettings, ExternalSettings, JobSettings, StacSettings

KEY = "dtk_ops-test-key-0123456789abcdefghijklmnopq"


def _auth(tmp_path) -> AuthSettings:
    (tmp_path / "policy.yaml").write_text("groups:\n  team-a:\n    - collections: [spot67-demo]\n")
    (tmp_path / "keys.yaml").write_text(
        f"keys:\n  - id: a-1\n    sha256: {hash_api_key(KEY)}\n    user: ann\n    groups: [team-a]\n"
    )
    return AuthSettings(
        enabled=True, policy_file=str(tmp_path / "policy.yaml"), api_keys_file=str(tmp_path / "keys.yaml")
    )


def _routes(app):
    """(methods, full path, route) of every API route, included routers too (FastAPI nests them)."""
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            yield sorted(ctx.methods or ()), ctx.path_format, ctx.original_route


def test_every_route_declares_its_operation(dsn, cog_server, tmp_path):
    """All optional routers on: each API route carries exactly one Operation, matching its path."""
    settings = make_settings(dsn, auth=_auth(tmp_path), enabled=True, allowed_prefixes=[cog_server.url + "/"])
    settings.api = ApiSettings(enable_assets_endpoints=True)
    settings.stac = StacSettings(enabled=True)
    settings.external = ExternalSettings(enabled=True, allowed_prefixes=[cog_server.url + "/"])
    # export jobs on (no Redis is contacted until a job route is called)
    settings.jobs = JobSettings(redis_url="redis://127.0.0.1:9/0", results_dir=tmp_path / "jobs")
    app = create_app(settings)
    seen, undeclared = 0, []
    for methods, path, route in _routes(app):
        ops = declared_all(route)
        if len(ops) != 1:
            undeclared.append(f"{methods} {path}: {len(ops)} operations")
            continue
        op = ops[0]
        seen += 1
        if op.resource in ("collection", "stream"):
            assert "{collection_id}" in path, path
        if op.resource == "search":
            assert "{search_id}" in path, path
        if op.resource == "search_pair":
            assert path.startswith("/compare/searches/{before}/{after}/"), path
        if op.resource == "cog":
            assert path.startswith("/cog/"), path
        if op.resource == "external":
            assert path.startswith("/external/"), path
        if op.renders:  # reads pixels: tiles, previews, thumbnails, points, parts, statistics
            assert op.resource in ("collection", "search", "search_pair", "cog", "external"), path
    assert not undeclared, undeclared
    assert seen > 100  # titiler's factories are all there
    by_path = {(m, p): declared_all(r)[0] for ms, p, r in _routes(app) for m in ms}
    item = "/collections/{collection_id}/items/{item_id}"
    assert by_path[("GET", item + "/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}")].right == "tiles"
    assert by_path[("GET", item + "/asset_statistics")].right == "data"
    assert by_path[("GET", item + "/thumbnail.{format}")].sizes == "thumbnail"
    assert by_path[("POST", item + "/feature")].sizes == "part"
    assert by_path[("GET", item + "/assets/{asset_id}/statistics")].sizes == "statistics"
    assert by_path[("GET", "/cog/WMTSCapabilities.xml")].resource == "cog"
    assert by_path[("GET", "/external/thumbnail.{format}")].resource == "external"
    assert not by_path[("POST", "/searches/register")].store
    assert by_path[("GET", "/healthz")].resource == "public"
    pair = "/compare/searches/{before}/{after}"
    assert by_path[("GET", pair + "/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}")].resource == "search_pair"
    assert by_path[("GET", pair + "/WMTSCapabilities.xml")] == METADATA.on("search_pair")
    for method in ("GET", "POST"):
        export = by_path[(method, item + "/export.tif")]
        assert (export.right, export.resource) == ("data", "collection")
    assert by_path[("POST", item + "/export-jobs")].right == "data"
    assert by_path[("GET", "/jobs/{job_id}/result")].resource == "account"


def test_a_route_without_declaration_is_refused(dsn, tmp_path):
    """Deny by default: an endpoint added without an Operation is a 403, even with rights on its collection."""
    app = create_app(make_settings(dsn, auth=_auth(tmp_path)))
    router = APIRouter()

    @router.get("/collections/{collection_id}/undeclared")
    def undeclared(collection_id: str) -> dict:
        return {"leak": collection_id}

    @router.get("/collections/{collection_id}/declared", dependencies=[METADATA.on("collection").depends()])
    def declared_route(collection_id: str) -> dict:
        return {"ok": collection_id}

    app.include_router(router)
    ann = {"X-API-Key": KEY}
    with TestClient(app) as c:
        r = c.get("/collections/spot67-demo/undeclared", headers=ann)
        assert r.status_code == 403 and "leak" not in r.text
        assert c.get("/collections/spot67-demo/declared", headers=ann).json() == {"ok": "spot67-demo"}
        assert c.get("/collections/other/declared", headers=ann).status_code == 403
