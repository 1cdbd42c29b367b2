"""Connection pool for pgstac: opened in the app lifespan, checked before use."""

from __future__ import annotations

import logging

from psycopg_pool import ConnectionPool, PoolTimeout

from tiler.settings import DatabaseSettings

logger = logging.getLogger(__name__)


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
