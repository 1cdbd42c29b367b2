"""Shared tile cache in a real Redis: shared by two apps, rights exact, outages harmless, values checked."""

from __future__ import annotations

import logging
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RECORDED, free_port, make_settings
from fastapi.testclient import TestClient
from helpers import lonlat_of_item_centre, mercator_tile
from test_auth import A, auth_files, auth_settings, b_item, keys, make_jwt  # noqa: F401 - fixtures
from test_tilecache import overlap_tile, upstream_requests

from tiler.cache import CachedResponse
from tiler.main import create_app
from tiler.rediscache import decode, encode, redis_location
from tiler.settings import TileCacheSettings

redis = pytest.importorskip("redis")
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

Z = 15
TIMEOUT = 0.25
BACKOFF = 1.5


class RedisServer:
    """A private redis-server on 127.0.0.1 (no persistence), with a password."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--requirepass", self.password, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture()
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def shared_settings(url: str, **kw) -> TileCacheSettings:
    return TileCacheSettings(redis_url=url, redis_timeout=TIMEOUT, redis_backoff=BACKOFF, **kw)


def app_with_redis(dsn, url, auth=None, **kw):
    s = make_settings(dsn, auth=auth)
    s.cache = shared_settings(url, **kw)
    return create_app(s)


def settle(app) -> None:
    """The background writes to Redis of ``app`` are done (a miss does not wait for them)."""
    assert app.state.tile_cache.shared.flush(5), "background writes to Redis still pending after 5 s"


def test_a_tile_rendered_by_one_replica_is_a_hit_in_another(dsn, sample, recorded, redis_server):
    x, y = overlap_tile(sample)
    url = f"/collections/{RECORDED}/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    params = {"preset": "false-color"}
    app_a, app_b = app_with_redis(dsn, redis_server.url), app_with_redis(dsn, redis_server.url)
    with TestClient(app_a) as a, TestClient(app_b) as b:
        first, n_first = upstream_requests(recorded, lambda: a.get(url, params=params))
        assert first.status_code == 200 and first.headers["x-tile-cache"] == "miss" and n_first > 0
        settle(app_a)

        other, n_other = upstream_requests(recorded, lambda: b.get(url, params=params))
        assert other.status_code == 200 and other.headers["x-tile-cache"] == "hit-shared"
        assert n_other == 0, "a tile in Redis must not reach the COG host"
        assert other.content == first.content
        assert other.headers["content-type"] == "image/png"
        # the shared hit filled B's memory: the next one does not ask Redis
        again = b.get(url, params=params)
        assert again.headers["x-tile-cache"] == "hit" and again.content == first.content

        # with the URL token's ``token`` query parameter the key is the same
        assert b.get(url, params={**params, "token": "x"}).status_code == 200  # auth is off: token ignored
        cb = app_b.state.tile_cache
        assert (cb.hits, cb.shared_hits, cb.misses, cb.shared_errors) == (2, 1, 0, 0)

    # keys are hashed, prefixed and versioned; the value is not a pickle
    keys_ = redis_server.client().keys("*")
    assert len(keys_) == 1
    prefix, version, digest = keys_[0].decode().split(":")
    assert prefix == "dinamis-tiler" and version.startswith("v1-") and len(digest) == 64
    value = redis_server.client().get(keys_[0])
    assert value.startswith(b"DTC1") and value.endswith(first.content)
    ttl = redis_server.client().pttl(keys_[0])
    assert 0 < ttl <= 300_000


def test_rights_are_checked_on_a_shared_hit(dsn, sample, b_item, auth_files, keys, redis_server):  # noqa: F811
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, Z)
    url = f"/collections/{A}/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    alice = {"Authorization": f"Bearer {make_jwt(keys, 'alice', ['team-a'])}"}
    bob = {"Authorization": f"Bearer {make_jwt(keys, 'bob', ['team-b'])}"}
    low = {"Authorization": f"Bearer {make_jwt(keys, 'lea', ['lowres'])}"}
    app_a = app_with_redis(dsn, redis_server.url, auth=auth_settings(auth_files))
    app_b = app_with_redis(dsn, redis_server.url, auth=auth_settings(auth_files))
    with TestClient(app_a) as a, TestClient(app_b) as b:
        first = a.get(url, headers=alice)
        assert first.status_code == 200 and first.headers["x-tile-cache"] == "miss"
        settle(app_a)
        assert redis_server.client().dbsize() == 1

        # B finds the tile in Redis, and still refuses whom the policy refuses
        r = b.get(url)
        assert r.status_code == 401 and r.headers["cache-control"] == "no-store"
        assert r.content != first.content and "detail" in r.json()
        assert b.get(url, headers=bob).status_code == 403
        assert b.get(url, headers=low).status_code == 403  # above the group's max_zoom
        assert app_b.state.tile_cache.shared_hits + app_b.state.tile_cache.hits == 0

        ok = b.get(url, headers=alice)
        assert ok.status_code == 200 and ok.content == first.content
        assert ok.headers["x-tile-cache"].startswith("hit")
        assert ok.headers["cache-control"].startswith("private")


def render_time(client, url, params) -> float:
    t = time.perf_counter()
    r = client.get(url, params=params)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t


def test_redis_outage_never_fails_a_tile_and_is_recovered(dsn, sample, redis_server, caplog):
    caplog.set_level(logging.INFO, logger="tiler.rediscache")
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, 16)
    urls = [f"/collections/spot67-demo/tiles/WebMercatorQuad/16/{x + dx}/{y}.png" for dx in range(4)]
    params = {"preset": "natural"}
    app = app_with_redis(dsn, redis_server.url)
    cache = app.state.tile_cache
    with TestClient(app) as c:
        slowest_render = max(render_time(c, u, params) for u in urls)  # rendered, now in Redis
        settle(app)
        assert redis_server.client().dbsize() == len(urls)
        budget = slowest_render + TIMEOUT + 1.0  # generous: the bound is render + one socket timeout

        def outage_round() -> None:
            errors, started = cache.shared_errors, time.monotonic()
            for u in urls:
                cache.clear()  # every request goes to Redis (or skips it)
                t = time.perf_counter()
                r = c.get(u, params=params)
                elapsed = time.perf_counter() - t
                assert r.status_code == 200 and r.headers["x-tile-cache"] == "miss"
                assert elapsed < budget, f"{elapsed:.2f} s with Redis down"
            # one call per back-off period pays the failure; the others skip Redis (circuit open)
            failed = cache.shared_errors - errors
            assert 1 <= failed <= 1 + (time.monotonic() - started) / BACKOFF, failed
            assert cache.shared.skipped > 0 and cache.shared.down

        # 1. Redis hangs (SIGSTOP: connections accepted, never answered): bounded by the timeout
        redis_server.proc.send_signal(signal.SIGSTOP)
        outage_round()
        redis_server.proc.send_signal(signal.SIGCONT)
        hit = wait_for_shared_hit(c, cache, urls[0], params)
        assert hit.content and cache.shared.down is False

        # 2. Redis killed, then restarted empty on the same port
        redis_server.kill()
        outage_round()
        redis_server.start()
        wait_for_shared_hit(c, cache, urls[1], params)

    down = [r for r in caplog.records if "unavailable" in r.getMessage()]
    back = [r for r in caplog.records if "is back" in r.getMessage()]
    assert len(down) == 2 and len(back) == 2, [r.getMessage() for r in caplog.records]


def wait_for_shared_hit(c, cache, url, params):
    """Requests ``url`` (memory emptied each time) until Redis serves it: within the back-off."""
    deadline = time.monotonic() + BACKOFF + 5
    while time.monotonic() < deadline:
        cache.clear()
        r = c.get(url, params=params)
        assert r.status_code == 200
        if r.headers["x-tile-cache"] == "hit-shared":
            return r
        time.sleep(0.1)
    pytest.fail("shared hits did not resume after Redis came back")


def test_foreign_values_in_redis_are_ignored(dsn, sample, redis_server):
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, Z)
    url = f"/collections/spot67-demo/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    app = app_with_redis(dsn, redis_server.url)
    cache = app.state.tile_cache
    rc = redis_server.client()
    with TestClient(app) as c:
        good = c.get(url)
        assert good.status_code == 200 and good.headers["x-tile-cache"] == "miss"
        settle(app)
        (key,) = rc.keys("*")
        valid = rc.get(key)
        html = encode(CachedResponse(200, b"<script>alert(1)</script>", ((b"content-type", b"text/html"),)))
        injected = valid.replace(b'"image/png"', b'"image/png\\r\\nSet-Cookie: a=b"')
        assert injected != valid
        foreign = [
            secrets.token_bytes(200),
            b"\x80\x04\x95" + secrets.token_bytes(50) + b".",  # what a pickle looks like
            valid[:10],
            valid[:4] + b"\xff\xff" + valid[6:],  # another status
            html,
            injected,
        ]
        for n, value in enumerate(foreign, start=1):
            rc.set(key, value)
            cache.clear()
            r = c.get(url)
            assert r.status_code == 200 and r.headers["x-tile-cache"] == "miss", value[:20]
            assert r.content == good.content and "set-cookie" not in r.headers
            settle(app)
            assert cache.shared.invalid == n
            assert rc.get(key) == valid  # the render replaced it
        # another type under the key (WRONGTYPE from Redis): a miss, not an outage
        rc.delete(key)
        rc.rpush(key, b"x")
        cache.clear()
        r = c.get(url)
        assert r.status_code == 200 and r.content == good.content and r.headers["x-tile-cache"] == "miss"
        settle(app)
        assert cache.shared.invalid == len(foreign) + 1 and cache.shared_errors == 0
        cache.clear()
        assert c.get(url).headers["x-tile-cache"] == "hit-shared"  # SET replaced the list


def test_the_password_is_never_shown(dsn, sample, redis_server, caplog):
    caplog.set_level(logging.DEBUG)
    lon, lat = lonlat_of_item_centre(sample.item(0))
    x, y = mercator_tile(lon, lat, Z)
    url = f"/collections/spot67-demo/tiles/WebMercatorQuad/{Z}/{x}/{y}.png"
    wrong = redis_server.url.replace(redis_server.password, "wrong-" + redis_server.password[3:])
    texts = []
    for u in (redis_server.url, wrong):
        app = app_with_redis(dsn, u)
        with TestClient(app) as c:
            for path in (url, url, "/api", "/healthz", "/readyz"):
                r = c.get(path)
                assert r.status_code < 500
                texts.append(r.text + str(r.headers))
            settle(app)
        if u == wrong:
            assert app.state.tile_cache.shared_errors >= 1  # refused by Redis: logged below
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert f"127.0.0.1:{redis_server.port}" in logged  # the host is logged
    for secret in (redis_server.password, redis_server.password[3:]):
        assert secret not in logged
        assert not any(secret in t for t in texts)
    assert repr(shared_settings(wrong)).count("**********") == 1
    with pytest.raises(ValueError) as e:
        TileCacheSettings(redis_url=f"http://:{redis_server.password}@127.0.0.1:1")
    assert redis_server.password not in str(e.value)


def test_values_round_trip_and_locations_hide_credentials():
    entry = CachedResponse(200, b"\x89PNG...", ((b"content-type", b"image/png"), (b"etag", b'"abc"')))
    assert decode(encode(entry)) == entry
    empty = CachedResponse(204, b"", ())
    assert decode(encode(empty)) == empty
    assert decode(encode(CachedResponse(204, b"x", ()))) is None
    assert redis_location("redis://user:s3cret@cache.internal:6380/2") == "redis://cache.internal:6380"
    assert redis_location("rediss://:s3cret@cache.internal/0") == "rediss://cache.internal:6379"
    assert redis_location("unix://:s3cret@/run/redis.sock?db=1") == "unix:///run/redis.sock"


def test_server_works_without_redis_settings(client, sample):
    assert client.app.state.tile_cache.shared is None
    url = f"/collections/spot67-demo/items/{sample.item(0)['id']}/thumbnail.png"
    assert client.get(url, params={"size": 32}).status_code == 200


def test_writes_to_redis_are_in_the_background_and_bounded(redis_server):
    """A put never blocks its caller; while Redis hangs, writes beyond `max_pending` are dropped."""
    from tiler.rediscache import RedisTileStore

    store = RedisTileStore(
        redis_server.url, prefix="t", ttl=60, timeout=TIMEOUT, backoff=BACKOFF, max_entry_bytes=1 << 20
    )
    store.max_pending = 2
    entry = CachedResponse(200, b"x" * 100, ((b"content-type", b"image/png"),))
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        t = time.perf_counter()
        queued = [store.put_soon(f"k{i}", entry) for i in range(5)]
        assert time.perf_counter() - t < TIMEOUT / 2  # nobody waited for the hung Redis
        assert queued == [True, True, False, False, False] and store.dropped == 3
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert store.flush(TIMEOUT * 4 + 5)
    # once Redis answers again (after the back-off), a background write lands
    time.sleep(BACKOFF)
    assert store.put_soon("later", entry) and store.flush(5)
    assert store.get("later") is not None
    store.close()
