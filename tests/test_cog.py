"""`/cog` endpoints (allow-listed URLs) and the URL validator."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
from starlette.testclient import TestClient

from tests.conftest import make_settings
from tests.helpers import (
    expected_nearest,
    lonlat_of_item_centre,
    mercator_tile,
    mercator_tile_centres,
    read_tif,
)
from tiler.errors import DatasetURLNotAllowed, InvalidDatasetURL
from tiler.main import create_app
from tiler.rangeserver import RangeHTTPServer, RangeRequestHandler
from tiler.urls import validate_dataset_url

PREFIXES = ["https://data.example.org/cogs/", "http://127.0.0.1:8081/"]


def public(_host):
    return ["93.184.216.34"]


def private(_host):
    return ["10.1.2.3"]


@pytest.mark.parametrize(
    "url",
    [
        "https://data.example.org/cogs/a.tif",
        "https://DATA.example.org/cogs/sub/b.tif",
        "http://127.0.0.1:8081/x.tif",
    ],
)
def test_validator_accepts_allowed(url):
    assert validate_dataset_url(url, PREFIXES, resolve=public) == url


@pytest.mark.parametrize(
    "url,exc",
    [
        ("file:///etc/passwd", InvalidDatasetURL),
        ("/etc/passwd", InvalidDatasetURL),
        ("/vsicurl/https://data.example.org/cogs/a.tif", InvalidDatasetURL),
        ("/vsicurl?header_file=/etc/passwd&url=https://data.example.org/cogs/a.tif", InvalidDatasetURL),
        ("https://data.example.org/cogs/a.tif/vsizip/x", InvalidDatasetURL),
        ("<VRTDataset><VRTRasterBand/></VRTDataset>", InvalidDatasetURL),
        ("ftp://data.example.org/cogs/a.tif", InvalidDatasetURL),
        ("https://data.example.org/cogs/../secret.tif", InvalidDatasetURL),
        ("https://user:pw@data.example.org/cogs/a.tif", InvalidDatasetURL),
        ("https://data.example.org/cogsX/a.tif", DatasetURLNotAllowed),
        ("https://data.example.org.evil.net/cogs/a.tif", DatasetURLNotAllowed),
        ("https://data.example.org:444/cogs/a.tif", DatasetURLNotAllowed),
        ("http://data.example.org/cogs/a.tif", DatasetURLNotAllowed),
        ("http://127.0.0.1:9/x.tif", DatasetURLNotAllowed),
        ("http://2130706433:8081/x.tif", DatasetURLNotAllowed),
        ("http://[::1]:8081/x.tif", DatasetURLNotAllowed),
        ("http://169.254.169.254/latest/meta-data/", DatasetURLNotAllowed),
        ("http://10.0.0.1/x.tif", DatasetURLNotAllowed),
        ("http://172.16.0.1/x.tif", DatasetURLNotAllowed),
        ("http://192.168.1.1/x.tif", DatasetURLNotAllowed),
    ],
)
def test_validator_refuses(url, exc):
    with pytest.raises(exc):
        validate_dataset_url(url, PREFIXES, resolve=public)


def test_validator_refuses_allowed_name_resolving_to_private_address():
    # DNS rebinding: an allowed host name that resolves to 10.x is refused (no traffic: resolver injected)
    with pytest.raises(DatasetURLNotAllowed):
        validate_dataset_url("https://data.example.org/cogs/a.tif", PREFIXES, resolve=private)
    with pytest.raises(DatasetURLNotAllowed):
        validate_dataset_url(
            "https://data.example.org/cogs/a.tif", PREFIXES, resolve=lambda h: ["169.254.169.254"]
        )


def test_cog_tile_pixels(client, sample, cog_server):
    url = sample.item(0)["assets"]["ms"]["href"]
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, 15)
    r = client.get(f"/cog/tiles/WebMercatorQuad/15/{x}/{y}.tif", params={"url": url})
    assert r.status_code == 200, r.text
    got, valid = read_tif(r.content)
    exp, exp_valid = expected_nearest(sample.path(0, "ms"), *mercator_tile_centres(x, y, 15))
    both = valid & exp_valid
    assert np.all(got[:, both] == exp[:, both], axis=0).mean() > 0.97


class Canary:
    """A loopback listener that records whether anything connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.hits += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        self.t.join(1)
        self.sock.close()


def test_cog_ssrf_attempts_refused_and_canary_untouched(client, sample, tmp_path):
    canary = Canary()
    try:
        local = sample.path(0, "ms")
        attempts = [
            f"http://127.0.0.1:{canary.port}/x.tif",
            f"http://2130706433:{canary.port}/x.tif",
            f"http://[::1]:{canary.port}/x.tif",
            f"http://localhost:{canary.port}/x.tif",
            "file:///etc/passwd",
            str(local),
            f"/vsicurl?header_file=/etc/passwd&url=http://127.0.0.1:{canary.port}/x.tif",
            f'<VRTDataset rasterXSize="1" rasterYSize="1"><VRTRasterBand><SimpleSource><SourceFilename>{local}</SourceFilename></SimpleSource></VRTRasterBand></VRTDataset>',
        ]
        for url in attempts:
            r = client.get("/cog/info", params={"url": url})
            assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
            assert "detail" in r.json()
    finally:
        canary.close()
    assert canary.hits == 0


def test_cog_endpoints_off_by_default(dsn):
    app = create_app(make_settings(dsn))
    with TestClient(app) as c:
        assert c.get("/cog/info", params={"url": "http://127.0.0.1:1/x.tif"}).status_code == 404


def test_cog_enabled_without_prefixes_is_a_settings_error():
    from tiler.settings import CogSettings

    with pytest.raises(ValueError, match="ALLOWED_PREFIXES"):
        CogSettings(enabled=True)


class Redirector(RangeRequestHandler):
    """An allow-listed host with an open redirect to the canary."""

    def _serve(self, body: bool) -> None:
        if self.path.startswith("/go"):
            self.send_response(302)
            self.send_header("Location", self.server.target)  # type: ignore[attr-defined]
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super()._serve(body)


def test_cog_redirect_to_canary_refused(dsn, sample, tmp_path):
    canary = Canary()
    server = RangeHTTPServer(sample.directory, handler_class=Redirector)
    server.target = f"http://127.0.0.1:{canary.port}/x.tif"
    server.start_background()
    try:
        app = create_app(make_settings(dsn, enabled=True, allowed_prefixes=[server.url + "/"]))
        with TestClient(app) as c:
            r = c.get("/cog/info", params={"url": f"{server.url}/go/x.tif"})
            assert r.status_code == 403 and "redirect" in r.json()["detail"]
            # the same host without redirect works: the refusal is about the redirect
            name = sample.path(0, "ms").name
            assert c.get("/cog/info", params={"url": f"{server.url}/{name}"}).status_code == 200
    finally:
        server.shutdown()
        canary.close()
    assert canary.hits == 0
