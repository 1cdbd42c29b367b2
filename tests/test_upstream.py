"""Upstream credentials: per-prefix headers and signed hrefs, never echoed.

The "archive" is a real HTTP Range server on 127.0.0.1 that requires a header
under /protected/ and a current signature under /signed/ (it stands in for an
HTTPS archive or a signed-URL object store).
"""

from __future__ import annotations

import copy
import logging
import threading
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile

from tests.conftest import make_settings
from tests.helpers import SIGNER, lonlat_of_item_centre, mercator_tile, read_png
from tiler.ingest import load
from tiler.main import create_app
from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler
from tiler.settings import UpstreamSettings
from tiler.upstream import clear_http_cache

SECRET = "archive-secret-7f3a9c1e55"
C = "upstream-c"
RGB = {"assets": "ms|bidx=3,2,1", "rescale": "200,1800"}


class ArchiveHandler(RangeRequestHandler):
    """/protected/<file> needs X-Archive-Token; /signed/<file> needs ?sig=<current>."""

    def _serve(self, body: bool) -> None:
        parts = urlsplit(self.path)
        area, _, rest = parts.path.lstrip("/").partition("/")
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.seen.append((area, self.headers.get("X-Archive-Token"), parts.query))  # type: ignore[attr-defined]
            self.server.methods.append((area, self.command))  # type: ignore[attr-defined]
        if area == "protected" and self.headers.get("X-Archive-Token") != SECRET:
            self.send_error(401, "token required")
            return
        if area == "signed" and parse_qs(parts.query).get("sig") != [self.server.accepted]:  # type: ignore[attr-defined]
            self.send_error(403, "signature expired")
            return
        self.path = "/" + rest
        super()._serve(body)


@pytest.fixture(scope="module")
def archive(sample):
    server = RangeHTTPServer(sample.directory, handler_class=ArchiveHandler)
    server.seen = []
    server.methods = []
    server.accepted = "v1"
    server.lock = threading.Lock()
    server.start_background()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def c_items(dsn, sample, archive):
    src = sample.item(0)
    items = []
    for area in ("protected", "signed"):
        it = copy.deepcopy(src)
        it["id"] = f"C-{area}"
        it["collection"] = C
        for a in it["assets"].values():
            a["href"] = f"{archive.url}/{area}/" + a["href"].rsplit("/", 1)[1]
        items.append(it)
    d = sample.directory / "c"
    d.mkdir(exist_ok=True)
    coll = copy.deepcopy(sample.collection) | {"id": C}
    (d / "collection.json").write_text(__import__("json").dumps(coll))
    (d / "items.ndjson").write_text("".join(__import__("json").dumps(i) + "\n" for i in items))
    load(dsn, [d / "collection.json", d / "items.ndjson"], progress=False)
    return items


@pytest.fixture(scope="module")
def creds_file(tmp_path_factory, archive):
    f = tmp_path_factory.mktemp("upstream") / "credentials.yaml"
    f.write_text(
        yaml.safe_dump(
            [
                {
                    "prefix": f"{archive.url}/protected/",
                    "headers": {"X-Archive-Token": "${TEST_ARCHIVE_TOKEN}"},
                },
                {"prefix": f"{archive.url}/signed/", "signer": "tests.helpers:test_signer"},
            ]
        )
    )
    return f


@pytest.fixture(scope="module")
def upstream_client(dsn, c_items, creds_file):
    mp = pytest.MonkeyPatch()
    mp.setenv("TEST_ARCHIVE_TOKEN", SECRET)
    settings = make_settings(dsn)
    settings.upstream = UpstreamSettings(credentials_file=str(creds_file))
    with TestClient(create_app(settings)) as c:
        yield c
    mp.undo()


def _tile(sample, z=15):
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, z)
    return f"tiles/WebMercatorQuad/{z}/{x}/{y}.png"


def test_without_credentials_the_archive_refuses_with_a_clean_502(dsn, c_items, sample):
    with TestClient(create_app(make_settings(dsn))) as c:
        r = c.get(f"/collections/{C}/items/C-protected/{_tile(sample)}", params=RGB)
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert SECRET not in r.text and "401" in r.json()["detail"]


def test_header_credential_is_sent_to_its_prefix_only(upstream_client, client, sample, archive, caplog):
    caplog.set_level(logging.DEBUG)
    c = upstream_client
    archive.seen.clear()
    r = c.get(f"/collections/{C}/items/C-protected/{_tile(sample)}", params=RGB)
    assert r.status_code == 200, r.text
    ref = client.get(f"/collections/spot67-demo/items/{sample.item(0)['id']}/{_tile(sample)}", params=RGB)
    assert np.array_equal(read_png(r.content), read_png(ref.content))  # same pixels as the open copy
    protected = [s for s in archive.seen if s[0] == "protected"]
    assert protected and all(tok == SECRET for _, tok, _ in protected)
    # the signed area of the same host never receives the header
    c.get(f"/collections/{C}/items/C-signed/{_tile(sample)}", params=RGB)
    assert all(tok is None for area, tok, _ in archive.seen if area == "signed")
    # nowhere in responses or logs
    for path in (
        f"/collections/{C}/items/C-protected/info?assets=ms",
        f"/collections/{C}/items/C-protected/assets",
        f"/collections/{C}/items/C-protected/WebMercatorQuad/tilejson.json?assets=ms",
        f"/collections/{C}/items/C-protected/WMTSCapabilities.xml?assets=ms",
        f"/collections/{C}/{_tile(sample)}?assets=ms",
    ):
        r = c.get(path)
        assert r.status_code < 500 and SECRET not in r.text, path
    # an AOI export reads through the credential: the open copy's pixels, no secret in the file
    lon, lat = lonlat_of_item_centre(sample.item(0))
    bbox = {"bbox": f"{lon - 0.002},{lat - 0.002},{lon + 0.002},{lat + 0.002}", "asset": "ms"}
    r = c.get(f"/collections/{C}/items/C-protected/export.tif", params=bbox)
    ref = client.get(f"/collections/spot67-demo/items/{sample.item(0)['id']}/export.tif", params=bbox)
    assert r.status_code == ref.status_code == 200, r.text
    assert SECRET.encode() not in r.content and SECRET not in str(r.headers)
    with MemoryFile(r.content) as mine, MemoryFile(ref.content) as theirs:
        with mine.open() as a, theirs.open() as b:
            assert a.transform == b.transform and np.array_equal(a.read(), b.read())
    assert all(SECRET not in rec.getMessage() for rec in caplog.records)


def test_expired_signature_is_refreshed_once(upstream_client, sample, archive):
    c = upstream_client
    SIGNER.update(current="v1", cache={}, calls=[])
    archive.accepted = "v1"
    c.app.state.tile_cache.clear()  # earlier tests rendered this tile: read it from the archive
    clear_http_cache()  # and kept the file open: open it again, signed
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample)}", params=RGB)
    assert r.status_code == 200, (r.text, archive.seen[-5:], SIGNER)
    assert SIGNER["calls"] and not any(SIGNER["calls"])
    # the archive rotates its signature: the cached signed href now gets 403
    archive.accepted = SIGNER["current"] = "v2"
    archive.seen.clear()
    archive.methods.clear()
    clear_http_cache()  # as if GDAL had evicted the blocks: the next read goes to the archive
    c.app.state.tile_cache.clear()  # and the tile cache its tiles
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample, z=16)}", params=RGB)
    assert r.status_code == 200, r.text
    assert True in SIGNER["calls"]  # signed again with refresh=True
    queries = [q for area, _, q in archive.seen if area == "signed"]
    assert any("sig=v1" in q for q in queries) and any("sig=v2" in q for q in queries)
    # read through tiler.opener (the item gives file:size): signed and re-signed there, no HEAD
    assert archive.methods and ("signed", "HEAD") not in archive.methods
    # the signed query never shows in a response
    r = c.get(f"/collections/{C}/items/C-signed/info?assets=ms")
    assert r.status_code == 200 and "sig=" not in r.text
    # a signer that cannot produce an accepted signature: one retry, then a clean 502
    archive.accepted = "v9"
    SIGNER.update(current="v3", cache={}, calls=[])
    clear_http_cache()
    c.app.state.tile_cache.clear()
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample, z=14)}", params=RGB)
    assert r.status_code == 502 and "sig=" not in r.text
    assert SIGNER["calls"].count(True) == 1


def test_low_zoom_tile_through_a_signer(upstream_client, sample, archive, monkeypatch):
    """Low-zoom tiles (a footprint sub-window, see test_lowzoom) keep the re-sign and the clean 502."""
    import tiler.lowzoom

    taken = []
    real = tiler.lowzoom._paste
    monkeypatch.setattr(tiler.lowzoom, "_paste", lambda *a: taken.append(1) or real(*a))
    c = upstream_client
    SIGNER.update(current="w1", cache={}, calls=[])
    archive.accepted = "w1"
    clear_http_cache()
    c.app.state.tile_cache.clear()
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample, z=9)}", params=RGB)
    assert r.status_code == 200, r.text
    assert taken, "the low-zoom path was not taken"
    archive.accepted = SIGNER["current"] = "w2"
    clear_http_cache()
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample, z=10)}", params=RGB)
    assert r.status_code == 200, r.text
    assert True in SIGNER["calls"]
    archive.accepted = "w9"
    SIGNER.update(current="w3", cache={}, calls=[])
    clear_http_cache()
    r = c.get(f"/collections/{C}/items/C-signed/{_tile(sample, z=8)}", params=RGB)
    assert r.status_code == 502 and "sig=" not in r.text
    assert SIGNER["calls"].count(True) == 1


# --------------------------------------------------------------------------- raw streaming (/stream)


def test_stream_sends_the_header_credential_and_signs(upstream_client, sample, archive, caplog):
    """/stream reads the archive with the same per-prefix header and signer as the tiles."""
    caplog.set_level(logging.DEBUG)
    c = upstream_client
    data = sample.path(0, "ms").read_bytes()
    SIGNER.update(current="v1", cache={}, calls=[])
    archive.accepted = "v1"
    archive.seen.clear()
    for area in ("protected", "signed"):
        r = c.get(
            f"/stream/collections/{C}/items/C-{area}/assets/ms/C-{area}_ms.tif",
            headers={"Range": "bytes=10-109"},
        )
        assert r.status_code == 206 and r.content == data[10:110], (area, r.text)
        assert SECRET not in str(r.headers) and "sig=" not in str(r.headers)
    assert ("protected", SECRET, "") in archive.seen
    assert any(area == "signed" and q == "sig=v1" for area, _, q in archive.seen)
    # the header is sent to its prefix only: the signed area never saw it
    assert all(tok is None for area, tok, _ in archive.seen if area == "signed")
    # the archive rotates its signature: one refresh, then the bytes
    archive.accepted = SIGNER["current"] = "v2"
    r = c.get(
        f"/stream/collections/{C}/items/C-signed/assets/ms/C-signed_ms.tif", headers={"Range": "bytes=0-99"}
    )
    assert r.status_code == 206 and r.content == data[:100]
    assert SIGNER["calls"].count(True) == 1
    # a signature the archive never accepts: one retry, then a clean 502 naming the asset
    archive.accepted = "v9"
    SIGNER.update(current="v3", cache={}, calls=[])
    r = c.get(
        f"/stream/collections/{C}/items/C-signed/assets/ms/C-signed_ms.tif", headers={"Range": "bytes=0-99"}
    )
    assert r.status_code == 502 and "C-signed/ms" in r.json()["detail"] and "sig=" not in r.text
    assert SIGNER["calls"].count(True) == 1
    archive.accepted = SIGNER["current"] = "v1"
    ours = "\n".join(  # the archive's own access log (tiler.rangeserver) is the storage's, not ours
        caplog.handler.format(rec) for rec in caplog.records if rec.name != "tiler.rangeserver"
    )
    assert SECRET not in ours and "sig=v" not in ours


def test_stream_without_the_credential_is_a_clean_502(dsn, c_items):
    with TestClient(create_app(make_settings(dsn))) as c:
        r = c.get(
            f"/stream/collections/{C}/items/C-protected/assets/ms/C-protected_ms.tif",
            headers={"Range": "bytes=0-9"},
        )
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert "401" in r.json()["detail"] and "127.0.0.1" not in r.text


def test_stream_signer_without_an_http_url_is_a_clean_502(dsn, c_items, archive, tmp_path, caplog):
    """Proxy and redirect alike: a signed href that is not HTTP(S) is a 502 naming the asset, never the URL."""
    caplog.set_level(logging.DEBUG)
    creds = tmp_path / "credentials.yaml"
    creds.write_text(
        yaml.safe_dump(
            [
                {"prefix": f"{archive.url}/signed/", "signer": "tests.helpers:non_http_signer"},
                {
                    "prefix": f"{archive.url}/protected/",
                    "signer": "tests.helpers:non_http_signer",
                    "stream": "redirect",
                },
            ]
        )
    )
    settings = make_settings(dsn)
    settings.upstream = UpstreamSettings(credentials_file=str(creds))
    with TestClient(create_app(settings)) as c:
        for area in ("signed", "protected"):  # proxy, redirect
            r = c.get(
                f"/stream/collections/{C}/items/C-{area}/assets/ms/C-{area}_ms.tif",
                headers={"Range": "bytes=0-9"},
                follow_redirects=False,
            )
            assert r.status_code == 502, (area, r.text)
            assert r.json()["detail"] == f"The signer of asset C-{area}/ms did not give an HTTP URL."
            assert "location" not in r.headers and "storage.invalid" not in r.text + str(r.headers)
    logged = "\n".join(caplog.handler.format(rec) for rec in caplog.records)
    assert "sig=not-for-clients" not in logged and "storage.invalid" not in logged
