"""The viewer page in headless Chromium (Debian `chromium`), against a live server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_presets import C

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIDE = 330  # px of the side panel; the map is to its right

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",  # in CI, a missing Chromium fails the test
    reason="Debian `chromium` is not installed; `make test` installs it",
)


def screenshot(url: str, size=(1000, 700)) -> np.ndarray:
    out = Path(tempfile.mkdtemp(prefix="chromium-")) / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={out.parent / 'profile'}",
            f"--window-size={size[0]},{size[1]}",
            "--virtual-time-budget=20000",
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert out.exists(), "chromium wrote no screenshot"
    return np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB")).astype(int)


@needs_chromium
def test_viewer_shows_imagery_and_switching_preset_changes_it(live_server, sample):
    natural = screenshot(f"{live_server}/viewer?collection={C}&preset=natural")
    ndvi = screenshot(f"{live_server}/viewer?collection={C}&preset=ndvi")
    grey = np.array([0xE5, 0xE5, 0xE5])  # the map's background
    for shot in (natural, ndvi):
        m = shot[:, SIDE:]
        imagery = np.abs(m - grey).sum(axis=-1) > 30
        assert imagery.mean() > 0.1, "the map shows imagery, not an empty frame"
        assert m[imagery].std() > 15
    # NDVI paints vegetation green and soil yellow: a different picture of the same place
    diff = np.abs(natural[:, SIDE:] - ndvi[:, SIDE:]).sum(axis=-1) > 60
    assert diff.mean() > 0.1
    # the green channel dominates more in NDVI (rdylgn) than in natural colour
    assert (ndvi[:, SIDE:, 1] - ndvi[:, SIDE:, 0]).mean() > (natural[:, SIDE:, 1] - natural[:, SIDE:, 0]).mean()


@needs_chromium
def test_viewer_lists_items_and_urls(live_server, sample):
    # the page itself is static; the state it builds is in its URL fields (checked through the DOM dump)
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--dump-dom",
         f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
         f"{live_server}/viewer?collection={C}&preset=false-color&grid=LAMB93"],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout
    for it in sample.items:
        assert f'data-item="{it["id"]}"' in out
    assert f"/collections/{C}/LAMB93/map.html?preset=false-color" in out  # the iframe
    assert 'option value="pansharpened"' in out


def test_cors_is_off_by_default(client, sample, monkeypatch):
    from tiler.settings import ApiSettings

    monkeypatch.delenv("TILER_API_CORS_ORIGINS", raising=False)
    assert ApiSettings().cors_origins == []
    url = f"/collections/{C}/WebMercatorQuad/tilejson.json"
    r = client.get(url, headers={"Origin": "https://maps.example.org"})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("access-control-")]
    r = client.options(
        url, headers={"Origin": "https://maps.example.org", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in r.headers
    monkeypatch.setenv("TILER_API_CORS_ORIGINS", "https://maps.example.org, https://other.example")
    assert ApiSettings().cors_origins == ["https://maps.example.org", "https://other.example"]


def test_cors_allows_only_the_configured_origins(dsn, sample):
    from conftest import make_settings
    from starlette.testclient import TestClient

    from tiler.main import create_app

    settings = make_settings(dsn)
    settings.api.cors_origins = ["https://maps.example.org"]
    with TestClient(create_app(settings)) as c:
        url = f"/collections/{C}/WebMercatorQuad/tilejson.json"
        r = c.get(url, headers={"Origin": "https://maps.example.org"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://maps.example.org"
        r = c.get(url, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = c.options(
            url, headers={"Origin": "https://maps.example.org", "Access-Control-Request-Method": "GET"}
        )
        assert r.status_code == 200 and "GET" in r.headers["access-control-allow-methods"]
