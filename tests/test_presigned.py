"""``stream: redirect``: /stream answers a 307 to a presigned URL of a storage that checks it.

The storage is a real nginx (Debian's, with its ``secure_link`` module) serving the sample
COGs and refusing any URL whose signature or expiry is wrong; the tiler presigns with
`tiler.signers.secure_link`. GDAL (rasterio) follows the redirect once and reads the ranges
from nginx directly, as it does with S3 presigned URLs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from tests.conftest import make_settings, serve_app
from tests.helpers import NGINX, copy_items, run_nginx, write_auth
from tiler import signers
from tiler.auth import PolicyError
from tiler.ingest import load
from tiler.main import create_app
from tiler.settings import UpstreamSettings
from tiler.upstream import clear_http_cache, parse_credentials

SECRET = "storage-shared-" + "x" * 24
COLL = "presigned-demo"
ALICE, CAROL = "dtk_alice-" + "a" * 40, "dtk_carol-" + "c" * 40
POLICY = """
groups:
  team-a:
    - collections: [presigned-*]
  team-b:
    - collections: [spot67-demo]
"""

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx")


@pytest.fixture(scope="module")
def storage(sample, tmp_path_factory):
    """nginx serving the sample COGs under /cogs/, secure_link-checked: (base URL, access log)."""
    d = tmp_path_factory.mktemp("nginx-secure")
    (d / "www").mkdir()
    (d / "www" / "cogs").symlink_to(sample.directory)
    with run_nginx(
        d,
        d / "www",
        http='  map $args $dt_signature { default ""; "~(^|&)X-Amz-Signature=(?<s>[^&]*)" $s; }',
        server=f"""    location /cogs/ {{
      secure_link $dt_signature,$arg_Expires;
      secure_link_md5 "$secure_link_expires$uri {SECRET}";
      if ($secure_link = "") {{ return 403; }}
      if ($secure_link = "0") {{ return 410; }}
    }}""",
    ) as (base, log):
        yield base, log


@pytest.fixture(scope="module")
def server(dsn, sample, storage, tmp_path_factory):
    base_url, _ = storage
    d = tmp_path_factory.mktemp("presigned-conf")

    def rehost(items):
        for it in items:
            for asset in it["assets"].values():
                asset["href"] = f"{base_url}/cogs/" + asset["href"].rsplit("/", 1)[1]

    load(dsn, copy_items(sample, d, COLL, rehost), progress=False, stats=False)
    users = [("alice", ALICE, "team-a"), ("carol", CAROL, "team-b")]
    auth = write_auth(d, POLICY, users, signing_keys="k1:" + "p" * 40)
    (d / "credentials.yaml").write_text(
        f"- prefix: {base_url}/cogs/\n  signer: tiler.signers:secure_link\n  stream: redirect\n"
    )
    os.environ["TILER_SECURE_LINK_SECRET"] = SECRET
    signers.secure_link_settings.cache_clear()
    settings = make_settings(dsn, auth=auth)
    settings.upstream = UpstreamSettings(credentials_file=str(d / "credentials.yaml"))
    try:
        with serve_app(create_app(settings)) as (base, _):
            yield base
    finally:
        os.environ.pop("TILER_SECURE_LINK_SECRET", None)
        signers.secure_link_settings.cache_clear()


def _href(server: str, item_id: str, asset: str = "ms") -> str:
    r = httpx.get(
        f"{server}/stac/collections/{COLL}/items/{item_id}", headers={"X-API-Key": ALICE}, timeout=30
    )
    assert r.status_code == 200, r.text
    return r.json()["assets"][asset]["href"]


def _redirects(server: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    return sum(
        float(v) for v in re.findall(rf'tiler_stream_redirects_total\{{collection="{COLL}"\}} (\S+)', text)
    )


def test_stream_link_redirects_to_a_presigned_url_the_storage_accepts(server, sample, storage):
    base_url, _ = storage
    item = sample.item(0)["id"]
    href = _href(server, item)
    assert href.startswith(server) and "/stream/" in href
    data = sample.path(0, "ms").read_bytes()
    for method in ("GET", "HEAD"):
        r = httpx.request(method, href, headers={"Range": "bytes=0-99"}, follow_redirects=False)
        assert r.status_code == 307, r.text
        location = r.headers["location"]
        assert location.startswith(f"{base_url}/cogs/")
        q = parse_qs(urlsplit(location).query)
        assert int(q["Expires"][0]) > time.time() + 60 and q["X-Amz-Signature"][0]
        assert "no-store" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
        assert "dt1." not in location  # the caller's token stays with the tiler's link
    r = httpx.get(href, headers={"Range": "bytes=100-4195"}, follow_redirects=True)
    assert r.status_code == 206 and r.content == data[100:4196]
    assert r.headers["content-range"] == f"bytes 100-4195/{len(data)}"


def test_storage_refuses_unsigned_tampered_and_expired_urls(server, sample, storage):
    base_url, _ = storage
    name = sample.path(0, "ms").name
    path = f"/cogs/{name}"
    assert httpx.get(base_url + path).status_code == 403
    expires = int(time.time()) + 300
    good = signers.secure_link_signature(path, expires, SECRET)
    assert (
        httpx.get(
            f"{base_url}{path}?Expires={expires}&X-Amz-Signature={good}", headers={"Range": "bytes=0-9"}
        ).status_code
        == 206
    )
    assert httpx.get(f"{base_url}{path}?Expires={expires + 1}&X-Amz-Signature={good}").status_code == 403
    other = f"/cogs/{sample.path(1, 'ms').name}"
    assert httpx.get(f"{base_url}{other}?Expires={expires}&X-Amz-Signature={good}").status_code == 403
    past = int(time.time()) - 5
    old = signers.secure_link_signature(path, past, SECRET)
    assert httpx.get(f"{base_url}{path}?Expires={past}&X-Amz-Signature={old}").status_code == 410


def test_rights_are_checked_before_any_redirect(server, sample):
    item = sample.item(0)["id"]
    path = f"/stream/collections/{COLL}/items/{item}/assets/ms/{item}_ms.tif"
    r = httpx.get(server + path, headers={"X-API-Key": CAROL}, follow_redirects=False)
    assert r.status_code == 403 and "location" not in r.headers
    r = httpx.get(server + path, follow_redirects=False)
    assert r.status_code == 401 and "location" not in r.headers
    r = httpx.get(
        server + path.replace("_ms.tif", "_ms.tif.ovr"), headers={"X-API-Key": ALICE}, follow_redirects=False
    )
    assert r.status_code == 404 and "location" not in r.headers
    r = httpx.get(
        server + path, headers={"X-API-Key": ALICE, "Range": "bytes=0-1,5-6"}, follow_redirects=False
    )
    assert r.status_code == 416


def test_rasterio_follows_once_and_reads_ranges_from_the_storage(server, sample, storage):
    _, log = storage
    item = sample.item(1)
    href = _href(server, item["id"], "pan")
    clear_http_cache()
    with rasterio.open(sample.path(1, "pan")) as src:
        windows = [Window(0, 0, 64, 64), Window(700, 600, 128, 96), Window(300, 900, 50, 40)]
        expected = [src.read(window=w) for w in windows]
        overview = src.read(out_shape=(src.count, src.height // 4, src.width // 4))
    before, lines = _redirects(server), len(log.read_text().splitlines())
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_INGESTED_BYTES_AT_OPEN="16384"):
        with rasterio.open(href) as ds:
            got = [ds.read(window=w) for w in windows]
            ov = ds.read(out_shape=(ds.count, ds.height // 4, ds.width // 4))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(ov, overview)
    asked = _redirects(server) - before
    storage_requests = [ln for ln in log.read_text().splitlines()[lines:] if item["id"] in ln]
    # GDAL asked the tiler once (the open) and read every range from the storage directly
    assert asked == 1, asked
    assert len(storage_requests) >= 3 and all(" 206" in ln or " 200" in ln for ln in storage_requests), (
        storage_requests
    )


def test_gdal_translate_cuts_an_aoi_through_the_redirect(server, sample, tmp_path):
    exe = shutil.which("gdal_translate")
    if exe is None:
        pytest.skip("gdal_translate")
    item = sample.item(2)
    href = _href(server, item["id"])
    with rasterio.open(sample.path(2, "ms")) as src:
        expected = src.read(window=Window(10, 20, 40, 30))
        left, top = src.transform @ (10, 20)
        right, bottom = src.transform @ (50, 50)
    out = tmp_path / "aoi.tif"
    subprocess.run(
        [exe, "-q", "-projwin", str(left), str(top), str(right), str(bottom), f"/vsicurl/{href}", str(out)],
        check=True,
        env={**os.environ, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"},
        timeout=120,
    )
    with rasterio.open(out) as got:
        np.testing.assert_array_equal(got.read(), expected)


def test_redirect_needs_a_signer_and_a_known_mode():
    with pytest.raises(PolicyError, match="needs a `signer`"):
        parse_credentials([{"prefix": "https://s.example.org/cogs/", "stream": "redirect"}])
    with pytest.raises(PolicyError, match="proxy or redirect"):
        parse_credentials([{"prefix": "https://s.example.org/cogs/", "stream": "teleport"}])
    creds = parse_credentials(
        [
            {
                "prefix": "https://s.example.org/cogs/",
                "signer": "tiler.signers:secure_link",
                "stream": "redirect",
            }
        ]
    )
    assert creds[0].stream == "redirect"


def test_signer_without_secret_is_a_clean_error(monkeypatch):
    from tiler.errors import UpstreamFailed

    monkeypatch.delenv("TILER_SECURE_LINK_SECRET", raising=False)
    signers.secure_link_settings.cache_clear()
    try:
        with pytest.raises(UpstreamFailed, match="TILER_SECURE_LINK_SECRET"):
            signers.secure_link("https://s.example.org/cogs/a.tif")
    finally:
        signers.secure_link_settings.cache_clear()
