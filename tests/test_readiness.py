"""/readyz: not ready (503, naming the failed check) while the database or the COG storage is unreachable.

All on 127.0.0.1: the real range server, a port bound then closed, small real HTTP
servers answering 503 or never answering, and a PostgreSQL cluster stopped for real.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from tests.conftest import free_port, make_settings
from tiler.main import create_app
from tiler.readiness import StorageProbe, probe
from tiler.settings import ApiSettings


class Switchable(BaseHTTPRequestHandler):
    """Answers with ``server.status`` and counts the requests it gets."""

    def do_GET(self):  # noqa: N802
        self.server.hits += 1
        self.send_response(self.server.status)
        self.send_header("Content-Length", "1")
        self.end_headers()
        self.wfile.write(b"x")

    def log_message(self, *args):
        pass


@pytest.fixture()
def switchable():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Switchable)
    srv.status, srv.hits = 206, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def silent():
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/cog.tif"
    sock.close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/cog.tif"  # bound, then closed: connection refused


def cog_url(sample) -> str:
    return sample.item(0)["assets"]["ms"]["href"]


def app_with(dsn: str, urls: list[str], ttl: float = 0.0, timeout: float = 1.0):
    s = make_settings(dsn)
    s.api = ApiSettings(
        readiness_probe_urls=",".join(urls), readiness_probe_timeout=timeout, readiness_cache_ttl=ttl
    )
    return create_app(s)


def test_probe_outcomes(sample, cog_server, switchable, silent):
    r = probe(cog_url(sample), timeout=2)
    assert r.ok and r.status == 206
    # the storage answered: reachable, even when the object is missing or needs credentials
    assert probe(cog_server.url + "/nothing-here.tif", timeout=2).ok
    switchable.status = 403
    assert probe(f"http://127.0.0.1:{switchable.server_port}/x.tif", timeout=2).ok
    switchable.status = 503
    r = probe(f"http://127.0.0.1:{switchable.server_port}/x.tif", timeout=2)
    assert not r.ok and r.status == 503
    r = probe(closed_port_url(), timeout=2)
    assert not r.ok and r.error == "ConnectionRefusedError"
    t0 = time.monotonic()
    r = probe(silent, timeout=0.5)
    assert not r.ok and r.error == "timeout"
    assert time.monotonic() - t0 < 3


def test_probe_urls_are_validated_and_shown_without_secrets(switchable):
    with pytest.raises(ValidationError):
        ApiSettings(readiness_probe_urls="s3://bucket/cogs/")
    with pytest.raises(ValidationError):
        ApiSettings(readiness_probe_urls="/local/file.tif")
    with pytest.raises(ValidationError):
        ApiSettings(readiness_probe_urls="http://user:pw@127.0.0.1/x.tif")
    url = f"http://127.0.0.1:{switchable.server_port}/x.tif?X-Amz-Signature=SECRET#frag"
    r = probe(url, timeout=2)
    assert r.ok and "SECRET" not in str(r.as_dict())
    assert r.url == f"http://127.0.0.1:{switchable.server_port}/x.tif"


def test_readyz_follows_storage(dsn, sample):
    with TestClient(app_with(dsn, [cog_url(sample)])) as c:
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ready"
        assert r.json()["checks"]["storage"][0]["status"] == 206
        assert r.headers["cache-control"] == "no-store"

    with TestClient(app_with(dsn, [cog_url(sample), closed_port_url()])) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["failed"] == ["storage"]
        assert body["checks"]["database"]["reachable"] is True
        assert [p["reachable"] for p in body["checks"]["storage"]] == [True, False]
        # /healthz stays a database ping: no storage check
        assert c.get("/healthz").status_code == 200
        assert c.get("/livez").status_code == 200


def test_readyz_storage_results_are_cached(dsn, switchable, caplog):
    caplog.set_level("INFO", logger="tiler.readiness")
    url = f"http://127.0.0.1:{switchable.server_port}/probe.tif"
    with TestClient(app_with(dsn, [url], ttl=1.0)) as c:
        for _ in range(5):
            assert c.get("/readyz").status_code == 200
        assert switchable.hits == 1
        switchable.status = 503
        assert c.get("/readyz").status_code == 200  # still the cached answer
        time.sleep(1.1)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["storage"][0]["status"] == 503
        switchable.status = 206
        time.sleep(1.1)
        assert c.get("/readyz").status_code == 200
        assert switchable.hits == 3
    # one line when the storage goes down, one when it is back (not one per probe)
    lines = [r.getMessage() for r in caplog.records if r.name == "tiler.readiness"]
    assert lines == [f"COG storage unreachable: {url} (503)", f"COG storage reachable again: {url}"]


def test_storage_probe_shares_one_round_between_threads(switchable):
    probe_ = StorageProbe([f"http://127.0.0.1:{switchable.server_port}/a.tif"] * 3, timeout=1, ttl=60)
    threads = [threading.Thread(target=probe_.check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert switchable.hits == 3  # one round of three URLs, not 8 x 3
    assert all(r.ok for r in probe_.check())


def test_readyz_follows_database(own_cluster, sample):
    app = app_with(own_cluster.dsn, [cog_url(sample)])
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        own_cluster.stop(mode="immediate")
        t0 = time.monotonic()
        r = c.get("/readyz")
        assert time.monotonic() - t0 < 5
        assert r.status_code == 503
        assert r.json()["failed"] == ["database"]
        assert r.json()["checks"]["storage"][0]["reachable"] is True
        assert own_cluster.password not in r.text
        own_cluster.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/readyz").status_code != 200:
            time.sleep(0.2)
        assert c.get("/readyz").json()["status"] == "ready"
