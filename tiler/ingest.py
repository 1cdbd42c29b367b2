"""Load STAC collections and items into pgstac: validate everything, then upsert in one transaction.

Before loading, raster assets get per-band statistics (`tiler.stats`) unless they
already have them, in the documents or in the database for the same file.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pystac
import rasterio
from pydantic import ValidationError
from rasterio.errors import RasterioError
from stac_pydantic import Collection as CollectionModel
from stac_pydantic import Item as ItemModel
from tqdm import tqdm

from tiler.settings import GdalSettings
from tiler.stats import has_statistics, is_raster_asset, raster_statistics

logger = logging.getLogger(__name__)

CHUNK = 500
STATS_WORKERS = 8


class InvalidStac(ValueError):
    """One or more STAC documents are invalid; nothing was loaded."""


@dataclass
class Documents:
    """Collections and items read from files, with where each came from."""

    collections: list[tuple[str, dict]] = field(default_factory=list)
    items: list[tuple[str, dict]] = field(default_factory=list)


def _classify(doc: object, where: str, out: Documents) -> None:
    if not isinstance(doc, dict):
        raise InvalidStac(f"{where}: expected a JSON object, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "Collection":
        out.collections.append((where, doc))
    elif kind == "Feature":
        out.items.append((where, doc))
    elif kind == "FeatureCollection":
        for i, feat in enumerate(doc.get("features", [])):
            _classify(feat, f"{where} feature {i}", out)
    elif kind == "Catalog":
        _read_catalog(where, out)
    else:
        raise InvalidStac(f"{where}: not a STAC Collection, Item, ItemCollection or Catalog (type={kind!r})")


def _read_catalog(path: str, out: Documents) -> None:
    cat = pystac.Catalog.from_file(path)
    for coll in cat.get_all_collections():
        out.collections.append(
            (f"{path} -> {coll.id}", coll.to_dict(include_self_link=False, transform_hrefs=False))
        )
    for item in cat.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        out.items.append(
            (f"{path} -> {item.id}", item.to_dict(include_self_link=False, transform_hrefs=False))
        )


def _read_ndjson(path: Path, text: str, out: Documents) -> None:
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                _classify(json.loads(line), f"{path}:{n}", out)
            except json.JSONDecodeError as e:
                raise InvalidStac(f"{path}:{n}: invalid JSON ({e.msg})") from e


def read_documents(paths: Iterable[str | Path]) -> Documents:
    """Read JSON, NDJSON or static catalog files into collections and items."""
    out = Documents()
    for p in map(Path, paths):
        if not p.exists():
            raise InvalidStac(f"{p}: no such file")
        text = p.read_text(encoding="utf-8")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data" and p.suffix not in (".ndjson", ".jsonl"):
                raise InvalidStac(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from e
            _read_ndjson(p, text, out)  # one document per line
            continue
        if isinstance(doc, dict) and doc.get("type") == "Catalog":
            _read_catalog(str(p), out)
        else:
            _classify(doc, str(p), out)
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def validate(docs: Documents, known_collections: set[str] | None = None) -> None:
    """Check every document; raise InvalidStac listing the first problems found."""
    problems: list[str] = []
    ids: set[str] = set()
    for where, coll in docs.collections:
        try:
            CollectionModel.model_validate(coll)
        except ValidationError as e:
            problems.append(f"{where}: invalid collection: {_first_error(e)}")
        ids.add(coll.get("id", ""))
    available = ids | (known_collections or set())
    for where, item in docs.items:
        try:
            ItemModel.model_validate(item)
        except ValidationError as e:
            problems.append(f"{where}: invalid item {item.get('id', '?')!r}: {_first_error(e)}")
            continue
        if not item.get("collection"):
            problems.append(f"{where}: item {item['id']!r} has no 'collection'")
        elif item["collection"] not in available:
            problems.append(
                f"{where}: item {item['id']!r} refers to unknown collection {item['collection']!r}"
            )
        if not item.get("assets"):
            problems.append(f"{where}: item {item['id']!r} has no assets")
        if len(problems) >= 20:
            break
    if problems:
        raise InvalidStac("invalid STAC, nothing was loaded:\n  " + "\n  ".join(problems))


@dataclass
class StatsReport:
    """What happened to the raster assets' statistics during one load."""

    computed: int = 0
    kept: int = 0  # already in the documents
    reused: int = 0  # taken from the database: same item, asset and file
    failed: int = 0  # unreadable file or band count not matching raster:bands


def _same_file(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("href", "file:size", "file:checksum"))


def _stored_assets(conn: psycopg.Connection, items: list[dict]) -> dict[tuple[str, str], dict]:
    """Assets of the items already in pgstac, hydrated, keyed by (collection, id)."""
    ids: dict[str, list[str]] = defaultdict(list)
    for item in items:
        ids[item["collection"]].append(item["id"])
    out: dict[tuple[str, str], dict] = {}
    for collection, chunk in ((c, ch) for c, all_ids in ids.items() for ch in _chunks(all_ids, CHUNK)):
        rows = conn.execute(
            "SELECT id, pgstac.content_hydrate(i) -> 'assets' FROM pgstac.items i"
            " WHERE collection = %s AND id = ANY(%s)",
            (collection, chunk),
        )
        for item_id, assets in rows:
            out[(collection, item_id)] = assets or {}
    return out


def _compute(asset: dict, gdal_options: Mapping[str, str | int]) -> tuple[list[dict], int | None]:
    env = dict(gdal_options)  # per-thread options only (GdalSettings.env_options: no GDAL_CACHEMAX)
    if asset.get("file:header_size"):
        env["GDAL_INGESTED_BYTES_AT_OPEN"] = asset["file:header_size"]
    with rasterio.Env(**env):
        return raster_statistics(asset["href"])


def add_statistics(
    items: list[dict],
    conn: psycopg.Connection | None = None,
    recompute: bool = False,
    gdal_options: Mapping[str, str | int] | None = None,
    progress: bool = False,
) -> StatsReport:
    """Write ``raster:bands[].statistics`` into the raster assets of ``items`` (in place).

    Assets whose bands all have statistics are left alone; so are assets whose
    item is already in the database (``conn``) with statistics for the same
    href, ``file:size`` and ``file:checksum``: those are copied. ``recompute``
    reads every raster asset again. A file that cannot be read is logged and
    loaded without statistics.
    """
    report = StatsReport()
    todo: list[tuple[dict, str, dict]] = []
    for item in items:
        for key, asset in item.get("assets", {}).items():
            if not is_raster_asset(asset):
                continue
            if has_statistics(asset) and not recompute:
                report.kept += 1
            else:
                todo.append((item, key, asset))

    if todo and conn is not None and not recompute:
        stored = _stored_assets(conn, [item for item, _, _ in todo])
        remaining = []
        for item, key, asset in todo:
            old = stored.get((item["collection"], item["id"]), {}).get(key)
            bands = asset["raster:bands"]
            if (
                old
                and _same_file(asset, old)
                and has_statistics(old)
                and len(old["raster:bands"]) == len(bands)
            ):
                for band, old_band in zip(bands, old["raster:bands"], strict=True):
                    band["statistics"] = old_band["statistics"]
                report.reused += 1
            else:
                remaining.append((item, key, asset))
        todo = remaining

    if not todo:
        return report
    options = dict(gdal_options if gdal_options is not None else GdalSettings().env_options())
    with (
        ThreadPoolExecutor(max_workers=min(STATS_WORKERS, len(todo))) as pool,
        tqdm(total=len(todo), unit="asset", disable=not progress, desc="statistics") as bar,
    ):
        futures = [pool.submit(_compute, asset, options) for _, _, asset in todo]
        for (item, key, asset), future in zip(todo, futures, strict=True):
            bar.update(1)
            try:
                stats, level = future.result()
            except (RasterioError, OSError) as e:
                logger.warning("no statistics for %s asset %r: %s", item["id"], key, e)
                report.failed += 1
                continue
            bands = asset["raster:bands"]
            if len(stats) != len(bands):
                logger.warning(
                    "no statistics for %s asset %r: %d bands in the file, %d in raster:bands",
                    item["id"],
                    key,
                    len(stats),
                    len(bands),
                )
                report.failed += 1
                continue
            for band, band_stats in zip(bands, stats, strict=True):
                band["statistics"] = band_stats
            report.computed += 1
            logger.debug("statistics of %s asset %r from overview level %s", item["id"], key, level)
    return report


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def load(
    dsn: str,
    paths: Iterable[str | Path],
    progress: bool = True,
    stats: bool = True,
    recompute_stats: bool = False,
    gdal_options: Mapping[str, str | int] | None = None,
) -> tuple[int, int]:
    """Validate then upsert the collections and items in ``paths``; return their counts.

    With ``stats``, raster assets get per-band statistics first (`add_statistics`;
    ``recompute_stats`` reads every file again). Everything is loaded in one
    transaction: an error leaves the database unchanged.
    """
    docs = read_documents(paths)
    with psycopg.connect(dsn, options="-c search_path=pgstac,public") as conn:
        known = {r[0] for r in conn.execute("SELECT id FROM pgstac.collections")}
        validate(docs, known)
        if stats:
            report = add_statistics(
                [it for _, it in docs.items],
                conn=conn,
                recompute=recompute_stats,
                gdal_options=gdal_options,
                progress=progress,
            )
            logger.info(
                "raster statistics: %d computed, %d already in the documents, %d reused from the database, %d failed",
                report.computed,
                report.kept,
                report.reused,
                report.failed,
            )
        conn.commit()  # end the read-only transaction before the load
        with conn.transaction():
            for _, coll in docs.collections:
                conn.execute("SELECT pgstac.upsert_collection(%s::jsonb)", (json.dumps(coll),))
            items = [it for _, it in docs.items]
            with tqdm(total=len(items), unit="item", disable=not progress or not items, desc="items") as bar:
                for chunk in _chunks(items, CHUNK):
                    conn.execute("SELECT pgstac.upsert_items(%s::jsonb)", (json.dumps(chunk),))
                    bar.update(len(chunk))
    logger.info("loaded %d collections and %d items", len(docs.collections), len(docs.items))
    return len(docs.collections), len(docs.items)
