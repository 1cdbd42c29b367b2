"""Upstream and database faults: clean 5xx JSON, no secrets, recovery without restart."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from helpers import copy_items
from starlette.testclient import TestClient

from tests.conftest import free_port, make_settings
from tiler.embedded import LocalCluster
from tiler.ingest import load
from tiler.main import create_app


def test_missing_cog_is_502_without_secrets(client, dsn, sample, cog_server, tmp_path):
    # in a collection of its own: the shared sample collection must stay readable for other tests
    def break_first(items):
        items[0]["id"] = "BROKEN_HREF"
        items[0]["assets"]["ms"]["href"] = cog_server.url + "/gone.tif?token=SECRET-TOKEN-123"

    load(dsn, copy_items(sample, tmp_path, "faults-broken", mutate=break_first), progress=False)
    item = {"collection": "faults-broken"}

    r = client.get(
        f"/collections/{item['collection']}/items/BROKEN_HREF/preview.png", params={"assets": "ms"}
    )
    assert r.status_code == 502
    assert "SECRET-TOKEN-123" not in r.text
    assert "detail" in r.json()
    # the server is fine afterwards
    ok = client.get(
        f"/collections/{item['collection']}/items/{sample.item(1)['id']}/preview.tif",
        params={"assets": "ms", "max_size": 32},
    )
    assert ok.status_code == 200


@pytest.fixture()
def own_cluster(sample):
    root = Path(tempfile.mkdtemp(prefix="tiler-pg-fault-"))
    c = LocalCluster(root, free_port())
    c.start()
    c.migrate()
    load(c.dsn, [sample.directory / "collection.json", sample.directory / "items.ndjson"], progress=False)
    yield c
    c.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


def test_database_outage_is_503_then_recovers(own_cluster, sample):
    s = make_settings(own_cluster.dsn)
    s.db.pool_timeout = 2.0
    app = create_app(s)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        own_cluster.stop(mode="immediate")

        t0 = time.monotonic()
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["database_online"] is False
        # a request needing the catalogue fails cleanly and quickly (not 500, no hang)
        r = c.get(
            "/collections/spot67-demo/tiles/WebMercatorQuad/15/1/1.png",
            params={"assets": "ms", "datetime": "2024-01-01T00:00:00Z/.."},
        )
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after")
        assert own_cluster.password not in r.text
        assert time.monotonic() - t0 < 15

        own_cluster.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/healthz").status_code != 200:
            time.sleep(0.2)
        assert c.get("/healthz").status_code == 200
        r = c.post("/searches/register", json={"collections": ["spot67-demo"]})
        assert r.status_code == 200
