"""Load STAC collections and items into pgstac: validate everything, then upsert in one transaction."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pystac
from pydantic import ValidationError
from stac_pydantic import Collection as CollectionModel
from stac_pydantic import Item as ItemModel
from tqdm import tqdm

logger = logging.getLogger(__name__)

CHUNK = 500


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


def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def load(dsn: str, paths: Iterable[str | Path], progress: bool = True) -> tuple[int, int]:
    """Validate then upsert the collections and items in ``paths``; return their counts.

    Everything is loaded in one transaction: an error leaves the database unchanged.
    """
    docs = read_documents(paths)
    with psycopg.connect(dsn, options="-c search_path=pgstac,public") as conn:
        known = {r[0] for r in conn.execute("SELECT id FROM pgstac.collections")}
        validate(docs, known)
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
