"""Start and stop of an application: database pool, GDAL credentials, STAC API, stream client, caches."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from tiler import datasets, mosaicsearch
from tiler.catalogue import catalogue
from tiler.db import connection_budget, open_pool
from tiler.settings import Settings
from tiler.stac import close_stac, open_stac
from tiler.upstream import Credential, install, set_signers, uninstall

logger = logging.getLogger(__name__)


def lifespan(
    settings: Settings, credentials: list[Credential]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: what it opens at start (in this order) it closes at the end.

    The STAC API (``app.state.stac``, when enabled) shares the start: its pool opens
    after the tiler's, so the connection budget counts both.
    """

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        app.state.dbpool = open_pool(settings.db, statement_timeout=settings.api.request_timeout)
        app.state.catalogue = catalogue(app.state.dbpool)
        mosaicsearch.configure(app.state.dbpool, enabled=settings.db.mosaic_search == "tiler")
        stac = app.state.stac
        stac_conn = settings.stac.max_conn if stac is not None else 0
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
            if getattr(app.state, "jobs", None) is not None:
                app.state.jobs.close()
            if app.state.tile_cache is not None and app.state.tile_cache.shared is not None:
                app.state.tile_cache.shared.close()

    return run
