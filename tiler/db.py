"""Connection pool for pgstac: opened in the app lifespan, checked before use."""

from __future__ import annotations

import logging
import time
from typing import Any

from psycopg import Connection, Cursor
from psycopg_pool import ConnectionPool, PoolTimeout

from tiler import deadline, metrics
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


class BudgetedPool(ConnectionPool):
    """A pool where one request waits at most ``timeout`` seconds in all for connections.

    titiler-pgstac retries a query up to 3 times on `OperationalError`, and `PoolTimeout` is
    one: without this a request would wait 4 x the pool timeout while the database is down.
    Here the waits of one request (its `tiler.deadline.Budget`) add up to at most the pool
    timeout, and never past the request's deadline; once spent, the next wait fails at once
    (503 with ``Retry-After``).
    """

    def getconn(self, timeout: float | None = None):
        """`ConnectionPool.getconn` with the request's remaining pool-wait allowance."""
        budget = deadline.current()
        if budget is None:
            return super().getconn(timeout)
        # a request past its deadline or whose client left takes no connection (and this is not
        # an OperationalError, so titiler-pgstac does not retry it)
        budget.check("waiting for a database connection")
        allowance = budget.pool_wait_left
        if allowance is None:
            allowance = self.timeout
        wait = min(timeout if timeout is not None else self.timeout, allowance, max(budget.remaining(), 0.0))
        t0 = time.monotonic()
        try:
            return super().getconn(max(wait, 0.001))
        finally:
            budget.pool_wait_left = max(allowance - (time.monotonic() - t0), 0.0)


def open_pool(settings: DatabaseSettings, statement_timeout: float | None = None) -> ConnectionPool:
    """Open a pool whose connections are checked on checkout.

    The server starts even when the database is down (the readiness endpoint
    says so and the pool reconnects by itself when it comes back).
    ``statement_timeout`` (seconds, the request deadline) bounds every query.
    """
    options = "-c search_path=pgstac,public -c application_name=dinamis-tiler"
    if statement_timeout:
        options += f" -c statement_timeout={int(statement_timeout * 1000)}"
    pool = BudgetedPool(
        conninfo=settings.dsn,
        min_size=settings.min_conn,
        max_size=settings.max_conn,
        timeout=settings.pool_timeout,
        max_idle=settings.max_idle,
        check=ConnectionPool.check_connection,
        connection_class=TimedConnection,
        kwargs={
            "options": options,
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


def connection_budget(
    pool: ConnectionPool, settings: DatabaseSettings, timeout: float = 2.0, stac_conn: int = 0
) -> str | None:
    """Compare the pools' worst case with the server's connection limit; a problem, or None.

    Needed: (``TILER_DB_MAX_CONN`` + ``stac_conn``, the STAC API's asyncpg pool) x workers
    x replicas + other clients' connections.
    Available: ``max_connections`` - ``superuser_reserved_connections`` (- ``reserved_connections``,
    PostgreSQL 16+). Returns None when it fits or when the server cannot be asked now.
    """
    try:
        with pool.connection(timeout=timeout) as conn:
            rows = dict(
                conn.execute(
                    "SELECT name, setting::int FROM pg_settings WHERE name IN "
                    "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
                ).fetchall()
            )
    except Exception as e:  # noqa: BLE001 - the database may be down at start
        logger.warning("could not check the database's connection budget: %s", type(e).__name__)
        return None
    available = rows.get("max_connections", 0) - rows.get("superuser_reserved_connections", 0)
    available -= rows.get("reserved_connections", 0)
    per_worker = settings.max_conn + stac_conn
    needed = per_worker * settings.workers * settings.replicas + settings.other_connections
    logger.info(
        "database connection budget: %d needed ((TILER_DB_MAX_CONN=%d + TILER_STAC_MAX_CONN=%d) x %d workers "
        "x %d replicas + %d other), %d available",
        needed,
        settings.max_conn,
        stac_conn,
        settings.workers,
        settings.replicas,
        settings.other_connections,
        available,
    )
    if needed <= available:
        return None
    return (
        f"the tiler's pools may open {needed} connections ((TILER_DB_MAX_CONN={settings.max_conn} + "
        f"TILER_STAC_MAX_CONN={stac_conn}) x "
        f"TILER_DB_WORKERS={settings.workers} x TILER_DB_REPLICAS={settings.replicas} + "
        f"TILER_DB_OTHER_CONNECTIONS={settings.other_connections}) but the database allows {available} "
        f"(max_connections={rows.get('max_connections')} - reserved "
        f"{rows.get('superuser_reserved_connections', 0) + rows.get('reserved_connections', 0)}): "
        "lower TILER_DB_MAX_CONN or raise max_connections"
    )
