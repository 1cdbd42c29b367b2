"""`tiler.mosaicsearch`: the same items as pgstac's geojsonsearch, hydrated as pgstac does.

The oracle is pgstac itself, in the test cluster: ``geojsonsearch`` for the item selection
and ``content_hydrate(jsonb, jsonb, jsonb)`` for the hydration.
"""

from __future__ import annotations

import json

import morecantile
import psycopg
import pytest
from fastapi.testclient import TestClient
from geojson_pydantic import Point, Polygon

from tests.conftest import make_settings
from tests.helpers import lonlat_of_item_centre
from tiler import mosaicsearch
from tiler.dependencies import MOSAIC_ITEM_FIELDS
from tiler.main import create_app

C = "spot67-demo"
TMS = morecantile.tms.get("WebMercatorQuad")

FIELDS = [
    dict(MOSAIC_ITEM_FIELDS),
    {"include": ["assets", "id", "bbox", "collection"]},  # titiler-pgstac's default
    {},
    {"include": ["properties.platform", "properties.no_such", "assets.ms.href", "geometry"]},
    {"exclude": ["assets.ms", "properties"]},
    {"include": ["assets", "properties"], "exclude": ["properties.datetime", "assets.pan.href"]},
]


def register(conn, search: dict) -> str:
    return conn.execute("SELECT hash FROM pgstac.search_query(%s::jsonb)", (json.dumps(search),)).fetchone()[
        0
    ]


@pytest.fixture()
def pg(dsn):
    with psycopg.connect(dsn, autocommit=True, options="-c search_path=pgstac,public") as conn:
        mosaicsearch.install(conn)
        yield conn


def geometries(sample) -> list[str]:
    """Tiles over the scenes at several zooms, a point in each scene, a polygon over all."""
    centres = [lonlat_of_item_centre(sample.item(i)) for i in range(3)]
    lons = [c[0] for c in centres]
    lats = [c[1] for c in centres]
    out = []
    for z in (10, 12, 13, 14, 15):
        for t in TMS.tiles(min(lons) - 0.05, min(lats) - 0.05, max(lons) + 0.05, max(lats) + 0.05, [z]):
            out.append(Polygon.from_bounds(*TMS.bounds(t)).model_dump_json(exclude_none=True))
    out = out[:: max(1, len(out) // 40)]
    out += [Point(type="Point", coordinates=c).model_dump_json() for c in centres]
    out.append(Polygon.from_bounds(min(lons), min(lats), max(lons), max(lats)).model_dump_json())
    return out


def pgstac_search(conn, geom, search_id, fields, items_limit=100, scan_limit=10000, covered=True):
    return conn.execute(
        "SELECT * FROM geojsonsearch(%s, %s, %s, %s, %s, '5 seconds', %s, %s)",
        (geom, search_id, json.dumps(fields), scan_limit, items_limit, covered, covered),
    ).fetchone()[0]["features"]


@pytest.mark.parametrize("sortby", ["-datetime", "id"])
def test_same_items_in_the_same_order_as_pgstac(pg, sample, sortby):
    search_id = register(
        pg,
        {
            "collections": [C],
            "sortby": [{"field": sortby.lstrip("-"), "direction": "desc" if sortby[0] == "-" else "asc"}],
        },
    )
    geoms = geometries(sample)
    counts = set()
    for fields in FIELDS[:3]:
        for covered in (True, False):
            for limit in (1, 100):
                for g in geoms:
                    want = pgstac_search(pg, g, search_id, fields, items_limit=limit, covered=covered)
                    got = mosaicsearch.search(pg, g, search_id, fields, 10000, limit, 5, covered, covered)
                    assert got == want, (fields, covered, limit, g)
                    counts.add(len(want))
    # the cases include empty tiles, one item, and overlaps (skipcovered off: all three)
    assert {0, 1, 2, 3} <= counts


def test_same_items_for_every_field_selection(pg, sample):
    search_id = register(pg, {"collections": [C]})
    geoms = geometries(sample)[::4]
    for fields in FIELDS:
        for g in geoms:
            assert mosaicsearch.search(pg, g, search_id, fields, 10000, 100, 5, True, True) == pgstac_search(
                pg, g, search_id, fields
            ), fields


def test_scan_limit_is_pgstacs(pg, sample):
    search_id = register(pg, {"collections": [C]})
    big = geometries(sample)[-1]
    for scan in (1, 2, 3):
        want = pgstac_search(pg, big, search_id, {}, scan_limit=scan, covered=False)
        got = mosaicsearch.search(pg, big, search_id, {}, scan, 100, 5, False, False)
        assert got == want


GEOMS_COLLECTION = "mosaicsearch-geometries"


def square(x0, y0, x1, y1):
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


@pytest.fixture()
def crafted(pg):
    """Items whose footprints cover each other (what skipcovered and exitwhenfull act on)."""
    if pg.execute("SELECT 1 FROM collections WHERE id = %s", (GEOMS_COLLECTION,)).fetchone():
        pg.execute("SELECT delete_collection(%s)", (GEOMS_COLLECTION,))
    pg.execute(
        "SELECT create_collection(%s::jsonb)",
        (
            json.dumps(
                {
                    "type": "Collection",
                    "id": GEOMS_COLLECTION,
                    "stac_version": "1.0.0",
                    "description": "test",
                    "license": "proprietary",
                    "links": [],
                    "extent": {
                        "spatial": {"bbox": [[10, 40, 14, 44]]},
                        "temporal": {"interval": [[None, None]]},
                    },
                    "item_assets": {"data": {"type": "image/tiff", "roles": ["data"]}},
                }
            ),
        ),
    )
    footprints = {
        "big": (square(10, 40, 11, 41), "2024-05-01"),
        "inside": (square(10.2, 40.2, 10.4, 40.4), "2024-04-01"),  # under "big"
        "partial": (square(10.8, 40.8, 11.5, 41.5), "2024-03-01"),
        "twin": (square(10, 40, 11, 41), "2024-02-01"),  # same footprint as "big"
        "far": (square(12, 42, 13, 43), "2024-01-01"),
        "strip": (square(10.5, 39.5, 10.6, 41.8), "2024-05-01"),  # same date as "big": id decides
    }
    items = [
        {
            "type": "Feature",
            "stac_version": "1.0.0",
            "id": i,
            "collection": GEOMS_COLLECTION,
            "geometry": g,
            "bbox": [
                g["coordinates"][0][0][0],
                g["coordinates"][0][0][1],
                g["coordinates"][0][2][0],
                g["coordinates"][0][2][1],
            ],
            "properties": {"datetime": f"{d}T00:00:00Z"},
            "links": [],
            "assets": {"data": {"href": f"http://127.0.0.1:9/{i}.tif"}},
        }
        for i, (g, d) in footprints.items()
    ]
    pg.execute("SELECT create_items(%s::jsonb)", (json.dumps(items),))
    yield [
        json.dumps(g)
        for g in (
            square(9.5, 39.5, 13.5, 43.5),
            square(10, 40, 11, 41),
            square(10.1, 40.1, 10.5, 40.5),
            square(10.9, 40.9, 11.1, 41.1),
            square(10.55, 40.5, 10.58, 40.6),
            square(14, 44, 15, 45),
            {"type": "Point", "coordinates": [10.3, 40.3]},
            {"type": "LineString", "coordinates": [[10.3, 40.3], [12.5, 42.5]]},
        )
    ]
    pg.execute("SELECT delete_collection(%s)", (GEOMS_COLLECTION,))


@pytest.mark.parametrize("sortby", ["-datetime", "datetime", "id"])
def test_covered_items_are_skipped_as_pgstac_does(pg, crafted, sortby):
    field = sortby.lstrip("-")
    search_id = register(
        pg,
        {
            "collections": [GEOMS_COLLECTION],
            "sortby": [{"field": field, "direction": "desc" if sortby[0] == "-" else "asc"}],
        },
    )
    skipped = 0
    for g in crafted:
        for covered in (True, False):
            for limit in (1, 2, 100):
                want = pgstac_search(pg, g, search_id, {}, items_limit=limit, covered=covered)
                got = mosaicsearch.search(pg, g, search_id, {}, 10000, limit, 5, covered, covered)
                assert got == want, (g, covered, limit)
        every = pgstac_search(pg, g, search_id, {}, covered=False)
        skipped += len(every) - len(pgstac_search(pg, g, search_id, {}, covered=True))
    assert skipped > 0, "some item must be skipped or cut off for the test to mean something"


def test_unknown_search_is_404_as_with_pgstacs_search(pg, client):
    with pytest.raises(psycopg.errors.NotNullViolation):  # what pgstac raises for an unknown hash
        mosaicsearch.search(
            pg,
            Point(type="Point", coordinates=[4, 45]).model_dump_json(),
            "0" * 32,
            {},
            10000,
            100,
            5,
            True,
            True,
        )
    r = client.get(f"/searches/{'0' * 32}/tiles/WebMercatorQuad/14/8345/5895.png?assets=ms")
    assert r.status_code == 404, r.text
    assert "not found" in r.json()["detail"]
    assert mosaicsearch.available(client.app.state.dbpool)


BASE = {
    "type": "Feature",
    "stac_version": "1.0.0",
    "collection": "c1",
    "assets": {
        "ms": {
            "type": "image/tiff",
            "roles": ["data"],
            "eo:bands": [{"name": "B0"}, {"name": "B1"}],
            "raster:bands": [{"nodata": 0, "scale": 1}, {"nodata": 0}],
            "title": "MS",
        },
        "pan": {"type": "image/tiff", "roles": ["data"], "gsd": 1.5},
        "thumb": {"type": "image/png", "roles": ["thumbnail"]},
    },
}

ITEMS = [
    # pgstac's do-not-merge marker: the item has no thumbnail and its pan has no gsd
    {
        "id": "a",
        "collection": "c1",
        "type": "Feature",
        "geometry": None,
        "bbox": [0, 0, 1, 1],
        "properties": {"datetime": "2024-01-01T00:00:00Z", "platform": "SPOT6"},
        "assets": {
            "ms": {"href": "http://h/a.tif", "file:size": 12},
            "pan": {"href": "http://h/p.tif", "gsd": "𒍟※"},
            "thumb": "𒍟※",
        },
    },
    # lists of the same length are merged element-wise, of another length taken from the item
    {
        "id": "b",
        "collection": "c1",
        "type": "Feature",
        "geometry": None,
        "properties": {"datetime": None, "platform": None, "extra": {"deep": None, "keep": [None, 1]}},
        "assets": {
            "ms": {"href": "h", "eo:bands": [{"common_name": "blue"}, {}], "raster:bands": [{"nodata": 1}]},
            "new": {"href": "n", "roles": []},
        },
    },
    # empty lists on both sides, scalars over objects, objects over scalars
    {
        "id": "c",
        "collection": "c1",
        "type": "Feature",
        "geometry": None,
        "stac_version": None,
        "properties": {},
        "assets": {"ms": {"href": "h", "roles": [], "eo:bands": "x"}, "pan": 3},
    },
    {"id": "d", "collection": "c1", "type": "Feature", "geometry": None, "assets": {}},
]
BASE_EMPTY_LISTS = {**BASE, "assets": {**BASE["assets"], "ms": {**BASE["assets"]["ms"], "roles": []}}}

HYDRATE_FIELDS = FIELDS + [
    {"include": ["assets.ms.eo:bands", "assets.pan", "properties.extra.deep", "id"]},
    {"exclude": ["assets.ms.eo:bands.0", "properties.extra.keep.0", "assets.nothing.here"]},
    {"include": []},
    {"include": ["properties.platform"], "exclude": ["collection"]},
]


@pytest.mark.parametrize("fields", HYDRATE_FIELDS, ids=lambda f: json.dumps(f))
def test_hydration_is_pgstacs(pg, fields):
    for base in (BASE, BASE_EMPTY_LISTS, None):
        for item in ITEMS:
            want = pg.execute(
                "SELECT content_hydrate(%s::jsonb, %s::jsonb, %s::jsonb)",
                (json.dumps(item), json.dumps(base) if base is not None else None, json.dumps(fields)),
            ).fetchone()[0]
            got = mosaicsearch.hydrate(json.loads(json.dumps(item)), base, fields)
            assert got == (want or {}), (item["id"], base is None)


def test_hydration_of_the_stored_items_is_pgstacs(pg):
    rows = pg.execute(
        "SELECT i.collection, i.id, jsonb_build_object('id', i.id, 'geometry', NULL, 'collection', i.collection, "
        "'type', 'Feature') || i.content, c.base_item FROM items i JOIN collections c ON c.id = i.collection"
    ).fetchall()
    assert rows
    for fields in FIELDS:
        for collection, item_id, stored, base in rows:
            want = pg.execute(
                "SELECT content_hydrate(i, %s::jsonb) FROM items i WHERE collection = %s AND id = %s",
                (json.dumps(fields), collection, item_id),
            ).fetchone()[0]
            want.pop("geometry", None)  # the search function adds it (tested above), not hydration
            assert mosaicsearch.hydrate(stored, base, fields) == want


def test_function_is_installed_at_first_use_and_replaced_when_stale(dsn, pg):
    pg.execute(f"COMMENT ON FUNCTION {mosaicsearch.SIGNATURE} IS 'an older version'")
    app = create_app(make_settings(dsn))
    with TestClient(app):
        pool = app.state.dbpool
        assert mosaicsearch.available(pool)
    comment = pg.execute(
        f"SELECT obj_description(to_regprocedure('{mosaicsearch.SIGNATURE}'), 'pg_proc')"
    ).fetchone()[0]
    assert comment == mosaicsearch.VERSION


def test_pgstac_setting_and_unusable_function_fall_back_to_pgstacs_search(dsn, pg, sample):
    """Same tile bytes from both paths; a role that cannot create the function still serves."""
    lon, lat = lonlat_of_item_centre(sample.item(0))
    t = TMS.tile(lon, lat, 14)
    url = f"/collections/{C}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.tif?assets=ms"
    bodies = {}
    for mode in ("tiler", "pgstac"):
        settings = make_settings(dsn)
        settings.db.mosaic_search = mode
        app = create_app(settings)
        with TestClient(app) as c:
            r = c.get(url)
            assert r.status_code == 200, r.text
            bodies[mode] = r.content
            assert mosaicsearch.available(app.state.dbpool) is (mode == "tiler")
    assert bodies["tiler"] == bodies["pgstac"]

    # a read-only role on a database without the function: pgstac's search, and a warning
    pg.execute("DROP FUNCTION IF EXISTS " + mosaicsearch.SIGNATURE)
    pg.execute("DROP ROLE IF EXISTS tiler_mosaic_ro")
    pg.execute("CREATE ROLE tiler_mosaic_ro LOGIN PASSWORD 'ro' IN ROLE pgstac_read")
    try:
        ro_dsn = psycopg.conninfo.make_conninfo(dsn, user="tiler_mosaic_ro", password="ro")
        app = create_app(make_settings(ro_dsn))
        with TestClient(app) as c:
            r = c.get(url)
            assert r.status_code == 200, r.text
            assert r.content == bodies["pgstac"]
            assert mosaicsearch.available(app.state.dbpool) is False
    finally:
        pg.execute("DROP OWNED BY tiler_mosaic_ro")
        pg.execute("DROP ROLE tiler_mosaic_ro")
        mosaicsearch.install(pg)


def test_install_losing_a_race_is_retried(dsn, pg, monkeypatch):
    """Another worker replacing the function at the same moment: this one falls back, then asks again."""
    import threading
    import time

    from tiler.db import open_pool
    from tiler.settings import DatabaseSettings

    monkeypatch.setattr(mosaicsearch, "RECHECK_S", 0.5)
    pg.execute(f"COMMENT ON FUNCTION {mosaicsearch.SIGNATURE} IS 'an older version'")
    pool = open_pool(DatabaseSettings(database_url=dsn, max_conn=2))
    other = psycopg.connect(dsn)  # the other worker, inside its transaction
    try:
        other.execute(mosaicsearch.DDL.replace(mosaicsearch.VERSION, "yet another version"))
        result = {}
        t = threading.Thread(target=lambda: result.update(first=mosaicsearch.available(pool)))
        t.start()
        time.sleep(1.0)  # ours now waits on the other's lock on the function
        other.commit()  # ours then fails: "tuple concurrently updated"
        t.join(30)
        assert result["first"] is False  # pgstac's search for now
        assert mosaicsearch.available(pool) is False  # not before RECHECK_S
        time.sleep(0.6)
        assert mosaicsearch.available(pool) is True  # installed at the next check
        comment = pg.execute(
            f"SELECT obj_description(to_regprocedure('{mosaicsearch.SIGNATURE}'), 'pg_proc')"
        ).fetchone()[0]
        assert comment == mosaicsearch.VERSION
    finally:
        other.close()
        pool.close()
        mosaicsearch.install(pg)
