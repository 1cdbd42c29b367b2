"""Rendered tile cache: repeated tiles read nothing upstream, rights are checked on every hit."""

from __future__ import annotations

import time

import pytest
from conftest import RECORDED, make_settings
from fastapi.testclient import TestClient
from helpers import lonlat_of_item_centre, mercator_tile
from test_auth import A, B, auth_files, auth_settings, b_item, keys, make_jwt  # noqa: F401 - fixtures

from tiler.auth import mint_url_token
from tiler.main import create_app
from tiler.settings import TileCacheSettings
from tiler.upstream import clear_http_cache

Z = 15


def overlap_tile(sample) -> tuple[int, int]:
    (lon1, lat1), (lon2, lat2) = lonlat_of_item_centre(sample.item(1)), lonlat_of_item_centre(sample.item(2))
    return mercator_tile((lon1 + lon2) / 2, (lat1 + lat2) / 2, Z)


def upstream_requests(server, get):
    """(response, number of requests the COG host saw) for ``get()``, with GDAL's own caches emptied."""
    server.ranges.clear()
    clear_http_cache(server.url)
    r = get()
    return r, len(server.ranges)


def test_repeated_mosaic_tile_costs_no_origin_request(client, sample, recorded):
    x, y = overlap_tile(sample)
    url = f"/collections/{RECORDED}/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    first, n_first = upstream_requests(recorded, lambda: client.get(url, params={"preset": "false-color"}))
    assert first.status_code == 200 and first.headers["x-tile-cache"] == "miss"
    assert n_first > 0

    again, n_again = upstream_requests(recorded, lambda: client.get(url, params={"preset": "false-color"}))
    assert again.status_code == 200 and again.headers["x-tile-cache"] == "hit"
    assert n_again == 0, "a repeated tile must not reach the COG host"
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"] == "image/png"

    # another picture of the same tile is another entry
    other, n_other = upstream_requests(recorded, lambda: client.get(url, params={"preset": "ndvi"}))
    assert other.headers["x-tile-cache"] == "miss" and n_other > 0 and other.content != first.content


def test_errors_are_not_kept_but_empty_mosaic_tiles_are(client, sample):
    item = sample.item(0)
    outside = f"/collections/spot67-demo/items/{item['id']}/tiles/WebMercatorQuad/{Z}/0/0.png"
    for _ in range(2):
        r = client.get(outside)
        assert r.status_code == 404 and "x-tile-cache" not in r.headers
    empty = f"/collections/spot67-demo/tiles/WebMercatorQuad/{Z}/100/100.png"
    assert client.get(empty).status_code == 204
    r = client.get(empty)
    assert r.status_code == 204 and r.headers["x-tile-cache"] == "hit" and r.content == b""


@pytest.fixture()
def small_cache_app(dsn):
    """An app whose cache holds about three tiles and forgets them after 1 s."""
    s = make_settings(dsn)
    s.cache = TileCacheSettings(max_mb=3 * 9 / 1024, ttl=1.0)
    return create_app(s)


def test_bounded_in_bytes_lru_and_expiry(small_cache_app, sample):
    app = small_cache_app
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, 17)
    urls = [f"/collections/spot67-demo/tiles/WebMercatorQuad/17/{x + dx}/{y}.png" for dx in range(-3, 3)]
    with TestClient(app) as c:
        cache = app.state.tile_cache
        sizes = []
        for u in urls:
            r = c.get(u, params={"preset": "natural"})
            assert r.status_code == 200 and r.headers["x-tile-cache"] == "miss"
            sizes.append(len(r.content))
            assert cache.size <= 3 * 9 * 1024
        assert len(cache) < len(urls), f"{len(cache)} entries of {sizes} bytes kept in 27 KiB"
        # least recently used first out: the last tile is still there, the first is not
        assert c.get(urls[-1], params={"preset": "natural"}).headers["x-tile-cache"] == "hit"
        assert c.get(urls[0], params={"preset": "natural"}).headers["x-tile-cache"] == "miss"
        time.sleep(1.1)
        assert c.get(urls[0], params={"preset": "natural"}).headers["x-tile-cache"] == "miss"


def test_a_cached_tile_is_served_only_to_callers_allowed_now(dsn, sample, b_item, auth_files, keys):  # noqa: F811
    settings = make_settings(dsn, auth=auth_settings(auth_files))
    app = create_app(settings)
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, Z)
    url = f"/collections/{A}/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    alice = {"Authorization": f"Bearer {make_jwt(keys, 'alice', ['team-a'])}"}
    bob = {"Authorization": f"Bearer {make_jwt(keys, 'bob', ['team-b'])}"}
    low = {"Authorization": f"Bearer {make_jwt(keys, 'lea', ['lowres'])}"}
    with TestClient(app) as c:
        first = c.get(url, headers=alice)
        assert first.status_code == 200 and first.headers["x-tile-cache"] == "miss"
        hit = c.get(url, headers=alice)
        assert hit.headers["x-tile-cache"] == "hit" and hit.content == first.content
        assert hit.headers["cache-control"].startswith("private")

        # the same URL, already rendered, for callers the policy refuses
        r = c.get(url)
        assert r.status_code == 401 and r.headers["cache-control"] == "no-store"
        assert c.get(url, headers=bob).status_code == 403
        assert c.get(url, headers=low).status_code == 403  # z15 is above the group's max_zoom 12

        # a URL token in the path reaches the same entry, and its scope still applies
        keyring = settings.auth.keys()
        token, _ = mint_url_token(keyring, sub="alice", groups=["team-a"], ttl=600)
        r = c.get(f"/t/{token}{url}")
        assert r.status_code == 200 and r.headers["x-tile-cache"] == "hit" and r.content == first.content
        scoped, _ = mint_url_token(keyring, sub="alice", groups=["team-a"], ttl=600, collections=[B])
        assert c.get(f"/t/{scoped}{url}").status_code == 403
        assert app.state.tile_cache.hits == 2


def test_thumbnail_revalidation_on_a_hit(client, sample):
    url = f"/collections/spot67-demo/items/{sample.item(0)['id']}/thumbnail.png"
    first = client.get(url, params={"size": 64})
    etag = first.headers["etag"]
    again = client.get(url, params={"size": 64})
    assert again.headers["x-tile-cache"] == "hit" and again.headers["etag"] == etag
    r = client.get(url, params={"size": 64}, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""


def test_band_order_is_part_of_the_key(client, sample):
    item = sample.item(0)
    lon, lat = lonlat_of_item_centre(item)
    x, y = mercator_tile(lon, lat, Z)
    url = f"/collections/spot67-demo/items/{item['id']}/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    rgb = client.get(url, params=[("assets", "ms|bidx=3,2,1"), ("rescale", "200,1800")])
    assert rgb.status_code == 200
    # the same parameters in another order: another picture, never the cached one
    bgr = client.get(url, params=[("assets", "ms|bidx=1,2,3"), ("rescale", "200,1800")])
    assert bgr.headers["x-tile-cache"] == "miss" and bgr.content != rgb.content
    a = client.get(
        f"/collections/spot67-demo/items/{item['id']}/assets/ms/tiles/WebMercatorQuad/{Z}/{x}/{y}.png",
        params=[("bidx", "3"), ("bidx", "2"), ("bidx", "1"), ("rescale", "200,1800")],
    )
    b = client.get(
        f"/collections/spot67-demo/items/{item['id']}/assets/ms/tiles/WebMercatorQuad/{Z}/{x}/{y}.png",
        params=[("bidx", "1"), ("bidx", "2"), ("bidx", "3"), ("rescale", "200,1800")],
    )
    assert a.status_code == b.status_code == 200
    assert b.headers["x-tile-cache"] == "miss" and a.content != b.content
