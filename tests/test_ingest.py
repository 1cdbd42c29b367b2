"""`tiler ingest`: validation before loading, one transaction, upserts."""

from __future__ import annotations

import json

import pytest

from tests.helpers import copy_items
from tiler.ingest import InvalidStac, load


def count(db, collection):
    return db.execute("SELECT count(*) FROM pgstac.items WHERE collection = %s", (collection,)).fetchone()[0]


def test_ingest_and_upsert(dsn, db, sample, tmp_path):
    paths = copy_items(sample, tmp_path, "ingest-test")
    assert load(dsn, paths, progress=False) == (1, 3)
    assert count(db, "ingest-test") == 3

    # upsert: same ids, changed property, no duplicates
    def bump(items):
        items[0]["properties"]["eo:cloud_cover"] = 42.0

    paths = copy_items(sample, tmp_path, "ingest-test", mutate=bump)
    load(dsn, paths, progress=False)
    assert count(db, "ingest-test") == 3
    cc = db.execute(
        "SELECT content->'properties'->>'eo:cloud_cover' FROM pgstac.items WHERE id = %s",
        (sample.items[0]["id"],),
    ).fetchall()
    assert "42.0" in {r[0] for r in cc}


def test_invalid_item_loads_nothing(dsn, db, sample, tmp_path):
    def break_last(items):
        del items[-1]["geometry"]

    paths = copy_items(sample, tmp_path, collection="ingest-bad", mutate=break_last)
    with pytest.raises(InvalidStac, match="geometry"):
        load(dsn, paths, progress=False)
    assert count(db, "ingest-bad") == 0
    assert db.execute("SELECT count(*) FROM pgstac.collections WHERE id = 'ingest-bad'").fetchone()[0] == 0


def test_unknown_collection_and_bad_json(dsn, sample, tmp_path):
    item = dict(sample.items[0], collection="does-not-exist")
    p = tmp_path / "item.json"
    p.write_text(json.dumps(item))
    with pytest.raises(InvalidStac, match="unknown collection"):
        load(dsn, [p], progress=False)
    p.write_text("{not json")
    with pytest.raises(InvalidStac, match="invalid JSON"):
        load(dsn, [p], progress=False)


def test_static_catalog(dsn, db, sample, tmp_path):
    import pystac

    cat = pystac.Catalog(id="cat", description="static catalog")
    coll = pystac.Collection.from_dict(dict(sample.collection, id="ingest-catalog", links=[]))
    cat.add_child(coll)
    for it in sample.items:
        coll.add_item(pystac.Item.from_dict(dict(it, collection="ingest-catalog", links=[])))
    cat.normalize_hrefs(str(tmp_path / "catalog"))
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    load(dsn, [tmp_path / "catalog" / "catalog.json"], progress=False)
    assert count(db, "ingest-catalog") == 3
