"""Connection pool for pgstac: opened in the app lifespan, checked before use."""

from __future__ import annotations

import logging
import time
from typing import Any

from psycopg import Connection, Cursor
from psycopg_pool import ConnectionPool, PoolTimeout

from tiler import metrics
from tiler.settings import DatabaseSettings

logger = logging.getLogger(__name__)


class TimedCursor(Cursor):
    """A cursor that reports the time of each query (`tiler.metrics.observe_query`)."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Execute, timed (client-side cursors fetch the whole result here)."""
        t0 = time.perf_counter()
        try:
            return super().execute(*args, **kwargs)
        finally:
            metrics.observe_query(time.perf_counter() - t0)


class TimedConnection(Connection):
    """Connections whose cursors are `TimedCursor`: titiler-pgstac's queries are timed too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """A psycopg connection with ``cursor_factory`` set to `TimedCursor`."""
        super().__init__(*args, **kwargs)
        self.cursor_factory = TimedCursor


def open_pool(settings: DatabaseSettings) -> ConnectionPool:
    """Open a pool whose connections are checked on checkout.

    The server starts even when the database is down (the readiness endpoint
    says so and the pool reconnects by itself when it comes back).
    """
    pool = ConnectionPool(
        conninfo=settings.dsn,
        min_size=settings.min_conn,
        max_size=settings.max_conn,
        timeout=settings.pool_timeout,
        max_idle=settings.max_idle,
        check=ConnectionPool.check_connection,
        connection_class=TimedConnection,
        kwargs={
            "options": "-c search_path=pgstac,public -c application_name=dinamis-tiler",
            "connect_timeout": settings.connect_timeout,
        },
        open=True,
        name="pgstac",
    )
    try:
        pool.wait(timeout=settings.connect_timeout + 1)
        logger.info("connected to %s", settings.redacted_dsn)
    except PoolTimeout:
        logger.error("database not reachable yet at %s; serving anyway", settings.redacted_dsn)
    return pool


def database_ok(pool: ConnectionPool, timeout: float = 1.0) -> bool:
    """True when a connection can be had and answers ``SELECT 1`` within ``timeout``."""
    try:
        with pool.connection(timeout=timeout) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def pgstac_version(pool: ConnectionPool, timeout: float = 1.0) -> str | None:
    """The pgstac schema version, or None when the database cannot say."""
    try:
        with pool.connection(timeout=timeout) as conn:
            row = conn.execute("SELECT pgstac.get_version()").fetchone()
            return row[0] if row else None
    except Exception:  # noqa: BLE001
        return None
