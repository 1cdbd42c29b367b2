"""Fixtures: a real PostgreSQL+PostGIS+pgstac cluster, COGs on a real Range HTTP server."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from helpers import copy_items
from starlette.testclient import TestClient

from tiler.embedded import LocalCluster
from tiler.ingest import load
from tiler.main import create_app
from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler
from tiler.sample import generate
from tiler.settings import AuthSettings, CogSettings, DatabaseSettings, Settings
from tiler.upstream import clear_http_cache

MS_SIZE = 256  # 1.5 km scenes: pan is 1024 px with one overview level


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="tiler-pg-"))
    c = LocalCluster(root, free_port())
    c.start()
    c.migrate()
    yield c
    c.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cog_server():
    root = Path(tempfile.mkdtemp(prefix="tiler-cogs-"))
    server = RangeHTTPServer(root)
    server.start_background()
    yield server
    server.shutdown()
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Sample:
    """Generated scenes: where the COGs are and their STAC documents."""

    directory: Path
    collection: dict
    items: list[dict]

    def item(self, index: int) -> dict:
        return self.items[index]

    def path(self, index: int, asset: str) -> Path:
        return self.directory / self.items[index]["assets"][asset]["href"].rsplit("/", 1)[1]


@pytest.fixture(scope="session")
def sample(cog_server) -> Sample:
    """3 overlapping scenes whose COGs are served by `cog_server`."""
    directory = Path(cog_server.directory)
    coll, items = generate(directory, cog_server.url, n_scenes=3, ms_size=MS_SIZE)
    return Sample(directory, coll, items)


@pytest.fixture(scope="session")
def dsn(cluster, sample) -> str:
    """DSN of the cluster with the sample collection loaded."""
    load(
        cluster.dsn, [sample.directory / "collection.json", sample.directory / "items.ndjson"], progress=False
    )
    return cluster.dsn


def make_settings(dsn: str, auth: AuthSettings | None = None, **cog) -> Settings:
    """Settings for a test app; access control off unless ``auth`` is given."""
    return Settings(
        db=DatabaseSettings(database_url=dsn, max_conn=4),
        cog=CogSettings(**cog) if cog else CogSettings(),
        auth=auth or AuthSettings(enabled=False),
    )


@pytest.fixture(scope="session")
def app(dsn, cog_server):
    return create_app(make_settings(dsn, enabled=True, allowed_prefixes=[cog_server.url + "/"]))


@pytest.fixture(scope="session")
def client(app):
    with TestClient(app) as c:
        yield c


@contextmanager
def serve_app(app, **config) -> Iterator[tuple[str, int]]:
    """``app`` behind a real uvicorn on 127.0.0.1 in a thread: yields (base URL, port), then stops it."""
    import uvicorn

    if "log_config" not in config:
        config.setdefault("log_level", "warning")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def live_server(dsn, cog_server):
    """The app behind a real uvicorn on 127.0.0.1, for clients that speak HTTP (GDAL, browsers...)."""
    with serve_app(create_app(make_settings(dsn))) as (base, _):
        yield base


@pytest.fixture()
def own_cluster(sample):
    """A PostgreSQL+pgstac cluster of the test's own (to stop and restart), with the sample loaded."""
    root = Path(tempfile.mkdtemp(prefix="tiler-pg-own-"))
    c = LocalCluster(root, free_port())
    c.start()
    c.migrate()
    load(c.dsn, [sample.directory / "collection.json", sample.directory / "items.ndjson"], progress=False)
    yield c
    c.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


RECORDED = "recorded"


class Recorder(RangeRequestHandler):
    def _serve(self, body: bool) -> None:
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.ranges.append((self.path, self.headers.get("Range")))  # type: ignore[attr-defined]
        super()._serve(body)


@pytest.fixture(scope="session")
def recorded(dsn, sample, tmp_path_factory):
    """Collection RECORDED: the sample items, served by a range server that records every request."""
    server = RangeHTTPServer(sample.directory, handler_class=Recorder)
    server.ranges = []
    server.lock = threading.Lock()
    server.start_background()

    def rehost(items):
        for it in items:
            for a in it["assets"].values():
                a["href"] = server.url + "/" + a["href"].rsplit("/", 1)[1]

    load(dsn, copy_items(sample, tmp_path_factory.mktemp("recorded"), RECORDED, rehost), progress=False)
    clear_http_cache(server.url)  # ingest read these files (statistics) in this process
    yield server
    server.shutdown()


@pytest.fixture()
def db(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
