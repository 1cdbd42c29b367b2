"""The items of a mosaic tile: pgstac's geometry search without its per-call overhead.

titiler-pgstac asks ``pgstac.geojsonsearch`` for each tile. On a tile with one item that
costs about 8 ms of database CPU, of which the item selection is about 1.3 ms: the rest is a
temporary table dropped and created on every call and the item hydrated twice in PL/pgSQL
(once for a ``RAISE NOTICE`` nobody reads). `tiler_mosaic.geometrysearch` runs the same loop
(same ``search_fromhash``, ``partition_queries``, ``st_intersection``/``st_union``/``st_area``
tests in the same order, same limits) and returns the items unhydrated with their
collections' ``base_item``; `hydrate` merges them in the worker, as `pgstac.content_hydrate`
does (its semantics: `jsonb_include`, `jsonb_exclude`, `merge_jsonb` with its null stripping).
This is the split pgstac itself offers to stac-fastapi (``nohydrate``).

The function is installed by ``tiler migrate`` (and by the server when its role may create
it), checked once per pool; with another pgstac minor version, or without the function, the
tiles use pgstac's ``geojsonsearch`` as before. ``TILER_DB_MOSAIC_SEARCH=pgstac`` forces that.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from typing import Any

from psycopg import errors as pg_errors

logger = logging.getLogger(__name__)

#: pgstac minor version whose ``geometrysearch`` the function below follows
PGSTAC_MINOR = "0.9."
#: bumped with any change of the function (the installed one is replaced when it differs)
VERSION = "dinamis-tiler mosaic search 1 (pgstac 0.9 geometrysearch)"
SIGNATURE = "tiler_mosaic.geometrysearch(geometry,text,jsonb,integer,integer,interval,boolean,boolean)"

DDL = f"""
CREATE SCHEMA IF NOT EXISTS tiler_mosaic;
CREATE OR REPLACE FUNCTION tiler_mosaic.geometrysearch(
    IN geom geometry,
    IN queryhash text,
    IN fields jsonb DEFAULT NULL,
    IN _scanlimit int DEFAULT 10000,
    IN _limit int DEFAULT 100,
    IN _timelimit interval DEFAULT '5 seconds'::interval,
    IN exitwhenfull boolean DEFAULT TRUE,
    IN skipcovered boolean DEFAULT TRUE
) RETURNS jsonb AS $$
DECLARE
    search searches%ROWTYPE;
    curs refcursor;
    _where text;
    query text;
    iter_record items%ROWTYPE;
    out_records jsonb[] := '{{}}'::jsonb[];
    collection_ids text[] := '{{}}'::text[];
    with_geometry boolean := include_field('geometry', fields);
    exit_flag boolean := FALSE;
    counter int := 1;
    scancounter int := 1;
    remaining_limit int := _scanlimit;
    tilearea float;
    unionedgeom geometry;
    clippedgeom geometry;
    unionedgeom_area float := 0;
    prev_area float := 0;
BEGIN
    -- pgstac.geometrysearch (0.9), without its temporary table and its notices; the items
    -- are returned as pgstac stores them, with their collections' base_item
    IF ST_GeometryType(geom) !~* 'polygon' THEN
        skipcovered = FALSE;
        exitwhenfull = FALSE;
    END IF;
    IF skipcovered THEN
        exitwhenfull := TRUE;
    END IF;

    search := search_fromhash(queryhash);
    IF search IS NULL THEN
        RAISE EXCEPTION 'Search with Query Hash % Not Found', queryhash;
    END IF;

    tilearea := st_area(geom);
    _where := format('%s AND st_intersects(geometry, %L::geometry)', search._where, geom);

    FOR query IN SELECT * FROM partition_queries(_where, search.orderby) LOOP
        query := format('%s LIMIT %L', query, remaining_limit);
        OPEN curs FOR EXECUTE query;
        LOOP
            FETCH curs INTO iter_record;
            EXIT WHEN NOT FOUND;
            IF exitwhenfull OR skipcovered THEN
                clippedgeom := st_intersection(geom, iter_record.geometry);
                IF unionedgeom IS NULL THEN
                    unionedgeom := clippedgeom;
                ELSE
                    unionedgeom := st_union(unionedgeom, clippedgeom);
                END IF;
                unionedgeom_area := st_area(unionedgeom);
                IF skipcovered AND prev_area = unionedgeom_area THEN
                    scancounter := scancounter + 1;
                    CONTINUE;
                END IF;
                prev_area := unionedgeom_area;
            END IF;
            -- what content_hydrate(items, collections, fields) merges with the base item
            out_records := out_records || (
                jsonb_build_object(
                    'id', iter_record.id,
                    'geometry', CASE WHEN with_geometry THEN ST_AsGeoJson(iter_record.geometry, 20)::jsonb END,
                    'collection', iter_record.collection,
                    'type', 'Feature'
                ) || iter_record.content
            );
            IF NOT iter_record.collection = ANY(collection_ids) THEN
                collection_ids := collection_ids || iter_record.collection;
            END IF;
            IF counter >= _limit
                OR scancounter > _scanlimit
                OR ftime() > _timelimit
                OR (exitwhenfull AND unionedgeom_area >= tilearea)
            THEN
                exit_flag := TRUE;
                EXIT;
            END IF;
            counter := counter + 1;
            scancounter := scancounter + 1;
        END LOOP;
        CLOSE curs;
        EXIT WHEN exit_flag;
        remaining_limit := _scanlimit - scancounter;
    END LOOP;

    RETURN jsonb_build_object(
        'features', to_jsonb(out_records),
        'base_items', coalesce(
            (SELECT jsonb_object_agg(c.id, c.base_item) FROM collections c WHERE c.id = ANY(collection_ids)),
            '{{}}'::jsonb
        )
    );
END;
$$ LANGUAGE PLPGSQL SET search_path = pgstac, public;
COMMENT ON FUNCTION {SIGNATURE} IS '{VERSION}';
GRANT USAGE ON SCHEMA tiler_mosaic TO pgstac_read;
"""

_CHECK = f"""
SELECT pgstac.get_version(),
       obj_description(to_regprocedure('{SIGNATURE}'), 'pg_proc')
"""


def install(conn: Any) -> None:
    """Create or replace the function (needs CREATE on the database; ``tiler migrate`` runs it)."""
    conn.execute(DDL)


def _usable(conn: Any) -> tuple[bool, bool]:
    """(usable now, worth installing): pgstac's minor version and the installed function's."""
    version, comment = conn.execute(_CHECK).fetchone()
    same_minor = bool(version) and str(version).startswith(PGSTAC_MINOR)
    return same_minor and comment == VERSION, same_minor and comment != VERSION


#: seconds before a pool asks again after an install that failed for another reason than rights
#: (e.g. another worker replacing the function at the same moment)
RECHECK_S = 30.0


class _State:
    """Per pool: (whether the tiles use `tiler_mosaic.geometrysearch`, when to ask again or None)."""

    def __init__(self) -> None:
        self.pools: weakref.WeakKeyDictionary[Any, tuple[bool, float | None]] = weakref.WeakKeyDictionary()
        self.disabled: weakref.WeakSet[Any] = weakref.WeakSet()
        self.lock = threading.Lock()


_STATE = _State()


def configure(pool: Any, enabled: bool) -> None:
    """Settings of a pool (``TILER_DB_MOSAIC_SEARCH``): with ``enabled`` false, pgstac's search only."""
    with _STATE.lock:
        _STATE.pools.pop(pool, None)
        if enabled:
            _STATE.disabled.discard(pool)
        else:
            _STATE.disabled.add(pool)


def _known(pool: Any) -> bool | None:
    entry = _STATE.pools.get(pool)
    if entry is None:
        return None
    usable, recheck_at = entry
    if recheck_at is not None and time.monotonic() >= recheck_at:
        return None
    return usable


def available(pool: Any) -> bool:
    """True when the pool's tiles use `tiler_mosaic.geometrysearch` (checked once, installed if missing).

    A database that cannot be reached is asked again at the next call, an install that failed
    for another reason than the role's rights (another worker installing it at the same moment)
    after `RECHECK_S`; a pgstac of another minor version, or a role that may not create the
    function, gives False for the pool's life.
    """
    if pool in _STATE.disabled:
        return False
    known = _known(pool)
    if known is not None:
        return known
    with _STATE.lock:
        known = _known(pool)
        if known is not None:
            return known
        recheck_at = None
        try:
            with pool.connection() as conn:
                usable, install_it = _usable(conn)
                if install_it:
                    try:
                        with conn.transaction():
                            install(conn)
                    except pg_errors.Error as e:
                        logger.warning(
                            "tiler_mosaic.geometrysearch not installed (%s); run `tiler migrate`",
                            e.__class__.__name__,
                        )
                        if not isinstance(e, pg_errors.InsufficientPrivilege):
                            recheck_at = time.monotonic() + RECHECK_S
                    usable, _ = _usable(conn)
        except Exception as e:  # noqa: BLE001 - the database is down: decide at the next call
            logger.debug("mosaic search check postponed: %s", e.__class__.__name__)
            return False
        _STATE.pools[pool] = (usable, None if usable else recheck_at)
        logger.info(
            "mosaic tiles use %s", "tiler_mosaic.geometrysearch" if usable else "pgstac.geojsonsearch"
        )
        return usable


def search(
    conn: Any,
    geometry_json: str,
    search_id: str,
    fields: dict,
    scan_limit: int,
    items_limit: int,
    time_limit: int,
    exitwhenfull: bool,
    skipcovered: bool,
) -> list[dict]:
    """The items of a geometry, as `pgstac.geojsonsearch` returns them (``features``)."""
    row = conn.execute(
        "SELECT tiler_mosaic.geometrysearch(st_geomfromgeojson(%s), %s, %s, %s, %s, %s::interval, %s, %s)",
        (
            geometry_json,
            search_id,
            json.dumps(fields),
            scan_limit,
            items_limit,
            f"{time_limit} seconds",
            exitwhenfull,
            skipcovered,
        ),
    ).fetchone()
    resp = row[0]
    base_items = resp["base_items"]
    return [hydrate(item, base_items.get(item["collection"]), fields) for item in resp["features"]]


# ---------------------------------------------------------------- pgstac's content_hydrate, in Python

#: what pgstac stores for "this key of the base item is absent from the item"
DO_NOT_MERGE = "𒍟※"
_MISSING = object()


def _strip_nulls(value: Any) -> Any:
    """``jsonb_strip_nulls``: object fields whose value is null go, at every depth."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _merge(a: Any, b: Any) -> Any:
    """``merge_jsonb(a, b)`` without its null stripping; `_MISSING` stands for SQL NULL (a key absent from one side).

    pgstac strips the nulls of every object it merges, at every depth; under the outermost
    object merge that is one ``jsonb_strip_nulls`` of the result, which `hydrate` applies.
    """
    if a == DO_NOT_MERGE:
        return None
    if a is _MISSING or a is None:
        return None if b is _MISSING else b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a.get(k, _MISSING), b.get(k, _MISSING)) for k in {**a, **b}}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        if not a:
            return None  # jsonb_agg over no rows
        return [_merge(x, y) for x, y in zip(a, b, strict=True)]
    return a


def _get_path(j: Any, path: list[str]) -> Any:
    """``j #> path`` (`_MISSING` when absent; list elements by integer index)."""
    for key in path:
        if isinstance(j, dict):
            if key not in j:
                return _MISSING
            j = j[key]
        elif isinstance(j, list):
            try:
                j = j[int(key)]
            except (ValueError, IndexError):
                return _MISSING
        else:
            return _MISSING
    return j


def _set_nested(out: dict, path: list[str], value: Any) -> dict:
    """``jsonb_set_nested``: missing parents become objects; an absent value is stored as null."""
    node: Any = out
    for key in path[:-1]:
        if not isinstance(node, dict):
            return out
        if key not in node:
            node[key] = {}
        node = node[key]
    if isinstance(node, dict):
        node[path[-1]] = None if value is _MISSING else value
    return out


def _include(j: dict, fields: dict) -> dict:
    """``jsonb_include``."""
    includes = fields.get("include") if isinstance(fields, dict) else None
    if not includes:
        return j
    includes = list(includes) + (["id", "collection"] if "collection" in j else ["id"])
    out: dict = {}
    for dotted in includes:
        _set_nested(out, dotted.split("."), _get_path(j, dotted.split(".")))
    return out


def _exclude(j: dict, fields: dict) -> dict:
    """``jsonb_exclude``."""
    excludes = fields.get("exclude") if isinstance(fields, dict) else None
    if not excludes:
        return j
    for dotted in excludes:
        *parents, last = dotted.split(".")
        node = _get_path(j, parents) if parents else j
        if isinstance(node, dict):
            node.pop(last, None)
        elif isinstance(node, list):
            try:
                del node[int(last)]
            except (ValueError, IndexError):
                pass
    return j


def _fields(j: dict, fields: dict) -> dict:
    """``jsonb_fields``: include, then exclude (on a copy when something is excluded)."""
    out = _include(j, fields)
    if fields.get("exclude"):
        out = _exclude(json.loads(json.dumps(out)), fields)
    return out


def hydrate(item: dict, base_item: dict | None, fields: dict | None) -> dict:
    """``pgstac.content_hydrate(item, base_item, fields)`` of a stored item (`merge_jsonb`: item first).

    A missing ``base_item`` (SQL NULL) is what pgstac makes of it: nothing without ``include``,
    else an object of nulls.
    """
    fields = fields if isinstance(fields, dict) else {}
    if base_item is None:
        base: Any = _fields({}, fields) if fields.get("include") else _MISSING
    else:
        base = _fields(base_item, fields)
    merged = _merge(_fields(item, fields), base)
    if isinstance(base, dict):  # an object merge: pgstac's null stripping, once for every depth
        merged = _strip_nulls(merged)
    return merged if isinstance(merged, dict) else {}
