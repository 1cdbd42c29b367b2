"""Health routes: ``/livez`` (the process answers), ``/healthz`` (database), ``/readyz`` (database and storage)."""

from __future__ import annotations

import rasterio
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse
from titiler.core import __version__ as titiler_version
from titiler.pgstac import __version__ as titiler_pgstac_version

from tiler import __version__
from tiler.db import database_ok, pgstac_version
from tiler.operations import HEALTH
from tiler.readiness import StorageProbe
from tiler.settings import ApiSettings

VERSIONS = {
    "dinamis-tiler": __version__,
    "titiler": titiler_version,
    "titiler.pgstac": titiler_pgstac_version,
    "rasterio": rasterio.__version__,
    "gdal": rasterio.__gdal_version__,
    "proj": rasterio.__proj_version__,
}
NO_STORE = {"Cache-Control": "no-store"}


def health_router(api: ApiSettings) -> APIRouter:
    """The three health routes; ``/readyz`` probes ``TILER_API_READINESS_PROBE_URLS``."""
    router = APIRouter(tags=["Health"], dependencies=[HEALTH.depends()])
    storage = StorageProbe(api.readiness_probe_urls, api.readiness_probe_timeout, api.readiness_cache_ttl)

    @router.get("/livez", summary="Liveness: the process answers (no I/O).")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @router.get(
        "/healthz",
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
            "versions": VERSIONS,
        }
        return JSONResponse(body, status_code=200 if ok else 503, headers=NO_STORE)

    @router.get(
        "/readyz",
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
        return JSONResponse(body, status_code=503 if failed else 200, headers=NO_STORE)

    return router
