"""The tiler's reads of pgstac, in one class with its cache.

`Catalogue` holds every SQL query the tiler sends to pgstac (the STAC API in
`tiler.stac`, titiler-pgstac's own mosaic queries and the token revocation list
aside): collections, registered searches, item and asset lookups, the presets,
stretch and zoom range of an item or mosaic, a mosaic's newest item. Lookups are cached ``ttl`` seconds (60 by default),
the collections a registered search names for the life of the process (a
search id is the hash of its query: it never changes).

There is one catalogue per database pool (`catalogue`), kept on
``app.state.catalogue`` by the lifespan; code that only holds the pool
(titiler-pgstac's backend, readers) reaches the same one through it.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import pystac
from cachetools import LRUCache, TTLCache
from rio_tiler.errors import MissingAssets
from titiler.pgstac.dependencies import get_stac_item
from titiler.pgstac.errors import MosaicNotFoundError
from titiler.pgstac.reader import PgSTACReader

from tiler.errors import AssetNotFound
from tiler.presets import (
    PresetContext,
    band_layout,
    builtin,
    item_context,
    merged,
    quicklook_key,
    stretch_by_band,
)

NEWEST_FIRST = [{"field": "datetime", "direction": "desc"}]
#: items whose stored percentiles make a mosaic's stretch
STRETCH_SAMPLE = 200


class Catalogue:
    """pgstac as the tiler reads it (``pool``: the app's psycopg pool)."""

    def __init__(self, pool: Any, ttl: float = 60, maxsize: int = 1024):
        """Lookups cached ``ttl`` seconds, at most ``maxsize`` of them."""
        self.pool = pool
        self._lookups: TTLCache = TTLCache(maxsize=maxsize, ttl=ttl)
        self._searches: LRUCache = LRUCache(maxsize=4096)
        self._lock = threading.Lock()

    def _cached(self, cache: Any, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in cache:
                return cache[key]
        value = compute()
        with self._lock:
            cache[key] = value
        return value

    def forget(self) -> None:
        """Drop every cached lookup (tests; the next requests read pgstac again)."""
        with self._lock:
            self._lookups.clear()
            self._searches.clear()

    # ------------------------------------------------------------------ queries

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.pool.connection() as conn:
            row = conn.execute(sql, params).fetchone()
        return row[0] if row else None

    def search_items(self, query: dict) -> list[dict]:
        """Features of ``pgstac.search(query)`` (STAC API search body: collections, limit, sortby, fields)."""
        result = self._one("SELECT pgstac.search(%s::jsonb)", (json.dumps(query),))
        return (result or {}).get("features", [])

    def collection_ids(self) -> list[str]:
        """Ids of every collection, sorted (not cached: a new collection shows at once)."""
        with self.pool.connection() as conn:
            return [r[0] for r in conn.execute("SELECT id FROM pgstac.collections ORDER BY id")]

    def collection(self, collection_id: str) -> dict | None:
        """The collection document, None when it does not exist."""
        return self._cached(
            self._lookups,
            ("collection", collection_id),
            lambda: self._one("SELECT pgstac.get_collection(%s)", (collection_id,)),
        )

    def search_restriction(self, search_id: str) -> tuple[str, ...] | None:
        """Collections a registered search is restricted to (None: unrestricted); KeyError when unknown."""

        def fetch() -> tuple[str, ...] | None:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT search FROM pgstac.searches WHERE hash = %s", (search_id,)
                ).fetchone()
            if row is None:
                raise KeyError(search_id)
            cols = row[0].get("collections") if isinstance(row[0], dict) else None
            return tuple(cols) if cols else None

        return self._cached(self._searches, ("restriction", search_id), fetch)

    def search_collection_ids(self, search_id: str) -> tuple[str, ...]:
        """Collections a registered search reads (all of them when it names none); 404 when unknown."""

        def fetch() -> tuple[str, ...]:
            try:
                cols = self.search_restriction(search_id)
            except KeyError:
                raise MosaicNotFoundError(f"SearchId `{search_id}` not found") from None
            return cols if cols is not None else tuple(self.collection_ids())

        return self._cached(self._lookups, ("search", search_id), fetch)

    def item(self, collection_id: str, item_id: str) -> pystac.Item:
        """One item (titiler-pgstac's lookup, 404 when missing)."""
        return get_stac_item(self.pool, collection_id, item_id)

    def asset(self, collection_id: str, item_id: str, asset_id: str, cached: bool = False) -> pystac.Asset:
        """One asset of an item, its href absolute; 404 when the item or asset does not exist."""

        def fetch() -> pystac.Asset:
            item = self.item(collection_id, item_id)
            asset = item.assets.get(asset_id)
            if asset is None:
                raise AssetNotFound(
                    f"Item '{item_id}' has no asset '{asset_id}' (has: {', '.join(sorted(item.assets))})"
                )
            asset.href = asset.get_absolute_href() or asset.href
            return asset

        if not cached:
            return fetch()
        return self._cached(self._lookups, ("asset", collection_id, item_id, asset_id), fetch)

    def stretch(self, collections: Sequence[str], layout: dict[str, str]) -> dict[str, tuple[float, float]]:
        """One 2-98 % stretch per band common name for a mosaic of ``collections``.

        The median, over the newest `STRETCH_SAMPLE` items, of the ``percentile_2`` and
        ``percentile_98`` that ``tiler ingest`` stored in each item's ``raster:bands``: every tile
        of the mosaic gets the same contrast, whichever scenes it shows.
        """

        def fetch() -> dict[str, tuple[float, float]]:
            query = {
                "collections": list(collections),
                "limit": STRETCH_SAMPLE,
                "fields": {"include": ["assets"]},
            }
            return stretch_by_band([f.get("assets") or {} for f in self.search_items(query)], layout)

        return self._cached(
            self._lookups, ("stretch", tuple(collections), tuple(sorted(layout.items()))), fetch
        )

    def presets(
        self,
        collection_id: str | None = None,
        item_id: str | None = None,
        search_id: str | None = None,
        item: pystac.Item | None = None,
    ) -> PresetContext:
        """Presets of an item, a collection mosaic or a search mosaic (the built-in ones for none)."""
        if item_id is not None and collection_id is not None:
            if item is None or item.id != item_id:
                item = self.item(collection_id, item_id)
            coll = self.collection(collection_id) or {}
            return item_context(item, coll.get("renders"), collection_id)
        if search_id is not None:
            collections = self.search_collection_ids(search_id)
        elif collection_id is not None:
            collections = (collection_id,)
        else:
            return PresetContext(dict(builtin()), {}, (), (), mosaic=False)
        docs = [d for c in collections if (d := self.collection(c))]
        if search_id is None and not docs:
            raise MosaicNotFoundError(f"CollectionId `{collection_id}` not found")
        item_assets: dict[str, dict] = {}
        renders: dict[str, Any] = {}
        for doc in reversed(docs):  # the first collection wins
            item_assets.update(doc.get("item_assets") or {})
            renders.update(doc.get("renders") or {})
        ql = quicklook_key(item_assets)
        return PresetContext(
            merged(renders),
            band_layout({k: a for k, a in item_assets.items() if k != ql}),
            tuple(item_assets),
            tuple(collections),
            mosaic=True,
            assets=item_assets,
            quicklook=ql,
        )

    def zooms(self, collections: Sequence[str], tms: Any) -> tuple[int, int] | None:
        """Zoom range of a mosaic of ``collections`` in ``tms``, from its newest item (rio-tiler's rule).

        maxzoom: the zoom whose resolution matches the item's finest asset (the pan band);
        minzoom: the zoom where the item's coarsest overview fits one tile. Needs the
        projection extension on the item; None without it.
        """

        def fetch() -> tuple[int, int] | None:
            features = self.search_items(
                {"collections": list(collections), "limit": 1, "sortby": NEWEST_FIRST}
            )
            if not features:
                return None
            item = pystac.Item.from_dict(features[0])
            try:
                with PgSTACReader(item, tms=tms) as src:
                    if src.crs is None or src.transform is None:
                        return None
                    return int(src.minzoom), int(src.maxzoom)
            except (MissingAssets, ValueError):
                return None

        return self._cached(self._lookups, ("zooms", tuple(collections), tms.id), fetch)

    def search_zooms(self, search_id: str, tms: Any) -> tuple[int, int] | None:
        """Zoom range of a search mosaic in ``tms`` (see `zooms`)."""
        return self.zooms(self.search_collection_ids(search_id), tms)

    def newest_item(self, search_id: str) -> tuple[str, str] | None:
        """(collection/id, datetime) of the newest item of a search mosaic, for ETags."""

        def fetch() -> tuple[str, str] | None:
            query = {
                "collections": list(self.search_collection_ids(search_id)),
                "limit": 1,
                "sortby": NEWEST_FIRST,
                "fields": {"include": ["id", "collection", "properties.datetime", "properties.updated"]},
            }
            features = self.search_items(query)
            if not features:
                return None
            f = features[0]
            props = f.get("properties") or {}
            return f"{f.get('collection')}/{f.get('id')}", str(props.get("updated") or props.get("datetime"))

        return self._cached(self._lookups, ("newest", search_id), fetch)


_CATALOGUES: weakref.WeakKeyDictionary[Any, Catalogue] = weakref.WeakKeyDictionary()
_CATALOGUES_LOCK = threading.Lock()


def catalogue(pool: Any) -> Catalogue:
    """The catalogue of ``pool`` (one per pool, made on first use)."""
    with _CATALOGUES_LOCK:
        found = _CATALOGUES.get(pool)
        if found is None:
            found = _CATALOGUES[pool] = Catalogue(pool)
        return found


def forget_all() -> None:
    """Drop the cached lookups of every catalogue (tests: the next requests read pgstac)."""
    with _CATALOGUES_LOCK:
        catalogues = list(_CATALOGUES.values())
    for c in catalogues:
        c.forget()
