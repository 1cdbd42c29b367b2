"""Dependencies that only parse the request run on the event loop; catalogue reads stay in the pool."""

from __future__ import annotations

import threading

import pytest
from starlette.concurrency import run_in_threadpool
from titiler.core.dependencies import DatasetParams, ImageRenderingParams, TileParams
from titiler.pgstac.dependencies import CollectionIdParams, ItemIdParams, SearchIdParams

import tiler.access as access
import tiler.dependencies as deps
from tests.helpers import item_centre_tile

C = "spot67-demo"


class _Hops(list):
    """Function names, in order; ``loop``: the thread that sent them (the event loop's)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: list[int] = []


@pytest.fixture()
def hops(monkeypatch):
    """Names of the functions sent to the thread pool before the endpoint; the event loop's thread."""
    seen = _Hops()
    loop = seen.loop

    async def counting(func, *args, **kwargs):
        loop.append(threading.get_ident())
        seen.append(getattr(func, "__qualname__", repr(func)))
        return await run_in_threadpool(func, *args, **kwargs)

    monkeypatch.setattr(deps, "run_in_threadpool", counting)  # sync dependencies, presets
    monkeypatch.setattr(access, "run_in_threadpool", counting)  # the rights check
    return seen


def _tile(client, sample, z: int, **params):
    item = sample.item(0)
    x, y = item_centre_tile(item, z)
    r = client.get(
        f"/collections/{C}/items/{item['id']}/tiles/WebMercatorQuad/{z}/{x}/{y}.png", params=params
    )
    assert r.status_code == 200, r.text
    assert r.headers.get("x-tile-cache") == "miss"  # rendered, not served from the tile cache
    return r


def test_an_item_tile_sends_only_the_item_lookup_to_the_pool(client, sample, hops):
    # (access control is off in this app: with it, `authorize` runs in the pool first)
    _tile(client, sample, 15, assets="ms|bidx=3,2,1", rescale="211,1799")
    assert hops == ["ItemIdParams"]  # was 13 hops: every parameter class and the rights check


def test_a_preset_is_resolved_in_the_pool(client, sample, hops):
    _tile(client, sample, 15, preset="false-color", rescale="212,1798")
    assert hops == ["ItemIdParams", "resolve_preset"]


def test_parsing_dependencies_run_on_the_event_loop(client, sample, hops, monkeypatch):
    threads: list[int] = []
    original = deps.LayerParams.__post_init__

    def post_init(self):
        threads.append(threading.get_ident())
        original(self)

    monkeypatch.setattr(deps.LayerParams, "__post_init__", post_init)
    _tile(client, sample, 16, assets="ms|bidx=3,2,1", rescale="213,1797")
    assert threads and set(threads) == set(hops.loop)


def test_which_dependencies_run_inline():
    for parser in (TileParams, DatasetParams, ImageRenderingParams, deps.LayerParams, deps.RenderParams):
        assert deps.is_inline(parser), parser
    for reader in (ItemIdParams, CollectionIdParams, SearchIdParams, deps.AssetIdParams):
        assert not deps.is_inline(reader), reader  # they query the database
