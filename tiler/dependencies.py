"""FastAPI dependencies: dataset URL allow-list, STAC item and asset lookup, GDAL environment."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
import pystac
from cachetools import TTLCache
from fastapi import Depends, Path, Query
from morecantile.errors import InvalidIdentifier
from pydantic import AfterValidator
from rasterio.crs import CRS
from rio_tiler.colormap import cmap as default_cmap
from rio_tiler.errors import MissingAssets
from starlette.requests import Request
from titiler.core.dependencies import AssetsExprParams, ImageRenderingParams, _parse_asset
from titiler.core.dependencies import ColorMapParams as TitilerColorMapParams
from titiler.pgstac.dependencies import ItemIdParams, PgSTACParams, get_stac_item
from titiler.pgstac.errors import MosaicNotFoundError
from titiler.pgstac.reader import PgSTACReader

from tiler.errors import AssetNotFound, DatasetURLNotAllowed, InvalidDatasetURL
from tiler.presets import (
    PansharpenSpec,
    Preset,
    Resolved,
    applicable,
    band_layout,
    builtin,
    common_name,
    merged,
)
from tiler.presets import get as get_preset
from tiler.settings import CogSettings, GdalSettings
from tiler.stats import stretch_range
from tiler.tms import supported_tms

ALLOWED_SCHEMES = ("http", "https", "s3")
MAX_URL_LENGTH = 2048


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse ``host`` as an IP literal, in every form libcurl would accept.

    ``2130706433``, ``0x7f.1`` and ``127.1`` are all 127.0.0.1 for a resolver
    that uses ``inet_aton``; they are parsed the same way here.
    """
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(h))
    except (OSError, ValueError):
        return None


def _is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


def _normalize(url: str) -> tuple[str, str, int | None, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError as e:
        raise InvalidDatasetURL("Invalid port in dataset URL") from e
    host = (parts.hostname or "").lower()
    return scheme, host, port, parts.path or "/"


def validate_dataset_url(
    url: str,
    allowed_prefixes: Sequence[str],
    resolve: Callable[[str], list[str]] | None = None,
) -> str:
    """Return ``url`` if it may be opened by GDAL, else raise.

    Rules: http(s) or s3 only; no local path, ``file:``, ``/vsi*`` or inline
    XML; scheme, host, port and path prefix must match one allowed prefix; a
    host written as a name must resolve to public addresses only (a private or
    loopback host must be written as an IP literal in the prefix to be used).

    Raises:
        InvalidDatasetURL: the value cannot be a remote COG URL (400).
        DatasetURLNotAllowed: well-formed but not allowed (403).

    """
    if not url or len(url) > MAX_URL_LENGTH:
        raise InvalidDatasetURL(f"Dataset URL must be 1 to {MAX_URL_LENGTH} characters")
    if any(c in url for c in "\r\n\t\x00") or url.lstrip().startswith("<"):
        raise InvalidDatasetURL("Dataset URL must be a plain URL")
    if "/vsi" in url.lower() or url.lower().startswith("vsi"):
        raise InvalidDatasetURL("GDAL virtual file system paths are not accepted")
    scheme, host, port, path = _normalize(url)
    if scheme not in ALLOWED_SCHEMES:
        raise InvalidDatasetURL(f"Dataset URL scheme must be one of {', '.join(ALLOWED_SCHEMES)}")
    if not host:
        raise InvalidDatasetURL("Dataset URL has no host")
    if "@" in urlsplit(url).netloc:
        raise InvalidDatasetURL("Credentials in the dataset URL are not accepted")
    if ".." in path.split("/"):
        raise InvalidDatasetURL("Dataset URL path must not contain '..'")

    for prefix in allowed_prefixes:
        p_scheme, p_host, p_port, p_path = _normalize(prefix)
        if (scheme, host, port) != (p_scheme, p_host, p_port):
            continue
        if not p_path.endswith("/"):
            p_path += "/"
        if path.startswith(p_path) or path + "/" == p_path:
            break
    else:
        raise DatasetURLNotAllowed("Dataset URL is not in the server's allow-list")

    if scheme in ("http", "https") and _ip_literal(host) is None:
        addrs = (resolve or _resolve)(host)
        if not addrs or not all(_is_public(ipaddress.ip_address(a)) for a in addrs):
            raise DatasetURLNotAllowed("Dataset host resolves to a non-public address")
    return url


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return []
    return [str(info[4][0]).split("%", 1)[0] for info in infos]


def cog_url_dependency(settings: CogSettings) -> Callable[..., str]:
    """Path dependency for ``/cog`` endpoints, bound to the allow-list in ``settings``."""
    prefixes = tuple(settings.allowed_prefixes)

    def DatasetURL(  # noqa: N802 - titiler naming
        url: Annotated[
            str,
            Query(
                description="URL of a Cloud Optimized GeoTIFF under one of the allowed prefixes.",
                openapi_examples={"cog": {"value": "https://data.example.org/cogs/scene.tif"}},
            ),
        ],
    ) -> str:
        url = validate_dataset_url(url, prefixes)
        refuse_redirects(url)
        return url

    return DatasetURL


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None  # surface 3xx as an HTTPError instead of following it


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
_checked: TTLCache = TTLCache(maxsize=4096, ttl=300)
_checked_lock = threading.Lock()


def refuse_redirects(url: str, timeout: float = 5.0) -> None:
    """Refuse a URL whose host answers with a redirect (GDAL would follow it anywhere).

    GDAL's HTTP client follows redirects and has no setting to stop it, so a
    redirect on an allow-listed host (an "open redirect") could point GDAL at
    a private address. One 1-byte range request, without following
    redirects, is made to the (already validated) URL before GDAL sees it;
    good answers are remembered for 5 minutes.
    """
    if not url.lower().startswith(("http://", "https://")):
        return
    with _checked_lock:
        if url in _checked:
            return
    req = urllib.request.Request(url, headers={"Range": "bytes=0-0"}, method="GET")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            resp.read(1)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise DatasetURLNotAllowed(
                "Dataset URL answers with a redirect; redirects are not followed"
            ) from None
        return  # 4xx/5xx: GDAL will report it (404 -> 4xx, else 502)
    except (urllib.error.URLError, OSError):
        return  # unreachable: GDAL will report it as an upstream error
    with _checked_lock:
        _checked[url] = True


def gdal_env_dependency(settings: GdalSettings) -> Callable[[], dict[str, str | int]]:
    """Environment dependency returning the GDAL options used for every read."""
    options = settings.options()

    def environment() -> dict[str, str | int]:
        return dict(options)

    return environment


def ItemParams(  # noqa: N802 - titiler naming
    request: Request, item: Annotated[pystac.Item, Depends(ItemIdParams)]
) -> pystac.Item:
    """The pgstac item (titiler-pgstac's ``ItemIdParams``), also kept on ``request.state``.

    ``native_extent`` reads it back so that WMTS layers get a BoundingBox
    projected from the item's own CRS rather than from its WGS84 envelope.
    """
    request.state.stac_item = item
    return item


def native_extent(request: Request) -> tuple[CRS, tuple[float, float, float, float]] | None:
    """CRS and bounds (projection extension) of the item this request reads, if any; no I/O."""
    item = getattr(request.state, "stac_item", None)
    if item is None:
        return None
    try:
        with PgSTACReader(item) as src:
            return src.crs, tuple(src.bounds)
    except MissingAssets:
        return None


def AssetIdParams(  # noqa: N802 - titiler naming
    request: Request,
    collection_id: Annotated[str, Path(description="STAC Collection Identifier")],
    item_id: Annotated[str, Path(description="STAC Item Identifier")],
    asset_id: Annotated[str, Path(description="STAC Asset Identifier")],
) -> str:
    """Href of one asset of a pgstac item; 404 when the item or asset does not exist."""
    return stac_asset(request.app.state.dbpool, collection_id, item_id, asset_id).href


def stac_asset(pool: Any, collection_id: str, item_id: str, asset_id: str) -> pystac.Asset:
    """One asset of a pgstac item, its href absolute; 404 when the item or asset does not exist."""
    item = get_stac_item(pool, collection_id, item_id)
    asset = item.assets.get(asset_id)
    if asset is None:
        raise AssetNotFound(
            f"Item '{item_id}' has no asset '{asset_id}' (has: {', '.join(sorted(item.assets))})"
        )
    asset.href = asset.get_absolute_href() or asset.href
    return asset


def cached_stac_asset(pool: Any, collection_id: str, item_id: str, asset_id: str) -> pystac.Asset:
    """`stac_asset`, cached 60 s like the other pgstac lookups (raw streams ask for it per range)."""
    return _cached(
        ("asset", collection_id, item_id, asset_id),
        lambda: stac_asset(pool, collection_id, item_id, asset_id),
    )


# --------------------------------------------------------------------------- presets


#: Fields of the items a mosaic reads: titiler-pgstac's, plus what pansharpening needs.
class _Fields(dict):
    """A JSON object that is also hashable (titiler-pgstac caches ``get_assets`` by its kwargs)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


MOSAIC_ITEM_FIELDS = _Fields(include=["assets", "id", "bbox", "collection", "properties.platform"])


@dataclass
class MosaicAssetsParams(PgSTACParams):
    """titiler-pgstac's item lookup options; items also carry ``properties.platform``."""

    fields: dict = field(init=False, default_factory=lambda: MOSAIC_ITEM_FIELDS)


STRETCH_SAMPLE = 200
_lookups: TTLCache = TTLCache(maxsize=1024, ttl=60)
_lookups_lock = threading.Lock()


def _cached(key: tuple, compute: Callable[[], Any]) -> Any:
    with _lookups_lock:
        if key in _lookups:
            return _lookups[key]
    value = compute()
    with _lookups_lock:
        _lookups[key] = value
    return value


def collection_document(pool: Any, collection_id: str) -> dict | None:
    """The pgstac collection (cached 60 s)."""

    def fetch() -> dict | None:
        with pool.connection() as conn:
            row = conn.execute("SELECT pgstac.get_collection(%s)", (collection_id,)).fetchone()
        return row[0] if row else None

    return _cached(("collection", collection_id), fetch)


def search_collection_ids(pool: Any, search_id: str) -> tuple[str, ...]:
    """Collections a registered search reads (all collections when it names none)."""

    def fetch() -> tuple[str, ...]:
        with pool.connection() as conn:
            row = conn.execute("SELECT search FROM pgstac.searches WHERE hash = %s", (search_id,)).fetchone()
            if row is None:
                raise MosaicNotFoundError(f"SearchId `{search_id}` not found")
            cols = row[0].get("collections") if isinstance(row[0], dict) else None
            if not cols:
                cols = [r[0] for r in conn.execute("SELECT id FROM pgstac.collections ORDER BY id")]
        return tuple(cols)

    return _cached(("search", search_id), fetch)


def collection_stretch(
    pool: Any, collections: Sequence[str], layout: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """One 2-98 % stretch per band common name for a mosaic of ``collections``.

    The median, over the newest `STRETCH_SAMPLE` items, of the ``percentile_2`` and
    ``percentile_98`` that ``tiler ingest`` stored in each item's ``raster:bands``: every tile
    of the mosaic gets the same contrast, whichever scenes it shows. Cached 60 s.
    """

    def fetch() -> dict[str, tuple[float, float]]:
        query = {"collections": list(collections), "limit": STRETCH_SAMPLE, "fields": {"include": ["assets"]}}
        with pool.connection() as conn:
            row = conn.execute("SELECT pgstac.search(%s::jsonb)", (json.dumps(query),)).fetchone()
        items = (row[0] or {}).get("features", []) if row else []
        return stretch_by_band([it.get("assets") or {} for it in items], layout)

    return _cached(("stretch", tuple(collections), tuple(sorted(layout.items()))), fetch)


def stretch_by_band(
    assets_of_items: Sequence[dict[str, dict]], layout: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """Per band common name, the median of the items' stored ``percentile_2`` and ``percentile_98``.

    Only the asset ``layout`` reads each band from counts (a quicklook's 8-bit red is not the
    multispectral red).
    """
    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    for assets in assets_of_items:
        for key, asset in assets.items():
            bands = asset.get("eo:bands") or asset.get("bands") or []
            stretch = stretch_range(asset.get("raster:bands")) or []
            for band, (lo, hi) in zip(bands, stretch, strict=False):
                if (name := common_name(band)) and layout.get(name) == key:
                    lows.setdefault(name, []).append(lo)
                    highs.setdefault(name, []).append(hi)
    return {n: (float(np.median(lows[n])), float(np.median(highs[n]))) for n in lows}


@dataclass(frozen=True)
class PresetContext:
    """The presets of the data a request reads, and what resolving them needs."""

    presets: dict[str, Preset]
    layout: dict[str, str]
    asset_keys: tuple[str, ...]
    collections: tuple[str, ...]
    mosaic: bool
    #: the item's assets (items) or the collections' item_assets (mosaics)
    assets: dict[str, dict] = field(default_factory=dict)
    item: pystac.Item | None = None
    #: key of a georeferenced quicklook asset (role ``overview``, with eo:bands), if any
    quicklook: str | None = None

    @property
    def available(self) -> dict[str, Preset]:
        """Presets whose bands exist here, in catalogue order (the first is the default)."""
        return applicable(self.presets, self.layout, self.asset_keys)


def preset_context(request: Request) -> PresetContext:
    """Presets of the item, collection or search in the request path (pgstac lookups cached)."""
    params = request.path_params
    return presets_for(
        request.app.state.dbpool,
        collection_id=params.get("collection_id"),
        item=getattr(request.state, "stac_item", None),
        item_id=params.get("item_id"),
        search_id=params.get("search_id"),
    )


def presets_for(
    pool: Any,
    collection_id: str | None = None,
    item_id: str | None = None,
    search_id: str | None = None,
    item: pystac.Item | None = None,
) -> PresetContext:
    """Presets of an item, a collection mosaic or a search mosaic (pgstac lookups cached)."""
    if item_id is not None and collection_id is not None:
        item = (
            item if item is not None and item.id == item_id else get_stac_item(pool, collection_id, item_id)
        )
        coll = collection_document(pool, collection_id) or {}
        assets = {k: a.to_dict() for k, a in item.assets.items()}
        ql = quicklook_key(assets)
        return PresetContext(
            presets=merged(coll.get("renders"), item.properties.get("renders")),
            layout=band_layout({k: a for k, a in assets.items() if k != ql}),
            asset_keys=tuple(assets),
            collections=(collection_id,),
            mosaic=False,
            assets=assets,
            item=item,
            quicklook=ql,
        )
    if search_id is not None:
        collections = search_collection_ids(pool, search_id)
    elif collection_id is not None:
        collections = (collection_id,)
    else:
        return PresetContext(dict(builtin()), {}, (), (), mosaic=False)
    docs = [d for c in collections if (d := collection_document(pool, c))]
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


def quicklook_key(assets: dict[str, dict]) -> str | None:
    """The asset to read instead of the COGs at small scales: role ``overview``, bands by common name."""
    for key, asset in assets.items():
        if "overview" in (asset.get("roles") or []) and any(
            common_name(b) for b in asset.get("eo:bands") or asset.get("bands") or []
        ):
            media = (asset.get("type") or "").lower()
            if not media or media.startswith("image/tiff"):
                return key
    return None


def below_cheap_zoom(request: Request, ctx: PresetContext) -> bool:
    """A tile request at a zoom below the data's minzoom (where the COGs' overviews run out)."""
    params = request.path_params
    if "z" not in params or "tileMatrixSetId" not in params:
        return False
    try:
        tms = supported_tms.get(params["tileMatrixSetId"])
        z = int(params["z"])
    except (KeyError, ValueError, InvalidIdentifier):
        return False
    if ctx.item is not None:
        with PgSTACReader(ctx.item, tms=tms) as src:
            minzoom = src.minzoom
    else:
        zooms = collection_zooms(request.app.state.dbpool, ctx.collections, tms)
        if zooms is None:
            return False
        minzoom = zooms[0]
    return z < minzoom


def resolve_preset(request: Request, name: str | None) -> Resolved | None:
    """``name`` (or the default preset) resolved for the data of this request; None if none applies."""
    ctx = preset_context(request)
    if name is None:
        available = ctx.available
        if not available:
            return None
        preset = next(iter(available.values()))
    else:
        preset = get_preset(ctx.presets, name)
    layout = ctx.layout
    resolved = preset.resolve(layout)
    if ctx.quicklook and not preset.assets and below_cheap_zoom(request, ctx):
        # at small scales read the quicklook instead, for the presets it can show
        ql_layout = band_layout({ctx.quicklook: ctx.assets[ctx.quicklook]})
        if preset.applies_to(ql_layout) and preset.pansharpen is None:
            layout, resolved = ql_layout, preset.resolve(ql_layout)
    if resolved.rescale is None and resolved.output_bands:
        # a preset is a picture: 8-bit, with the item's stretch, or one stretch for a mosaic
        stretch = (
            stretch_by_band([ctx.assets], layout)
            if not ctx.mosaic
            else collection_stretch(request.app.state.dbpool, ctx.collections, layout)
        )
        if stretch and all(b in stretch for b in resolved.output_bands):
            resolved = replace(resolved, rescale=tuple(stretch[b] for b in resolved.output_bands))
    return resolved


_EXPLICIT_LAYER = {"assets", "expression"}


def PresetParams(  # noqa: N802 - titiler naming
    request: Request,
    preset: Annotated[
        str | None,
        Query(
            description=(
                "Band preset (see `/presets` of the collection or item): natural, false-color, ndvi, "
                "panchromatic, pansharpened, or a STAC render of the collection. Explicit parameters "
                "(`assets`, `expression`, `rescale`, `colormap_name`...) override the preset's. "
                "Default: the first preset the data has (natural colour)."
            ),
            openapi_examples={"natural": {"value": "natural"}, "ndvi": {"value": "ndvi"}},
        ),
    ] = None,
) -> Resolved | None:
    """The preset of this request, resolved (None when ``assets``/``expression`` say it all)."""
    if preset is None and _EXPLICIT_LAYER & request.query_params.keys():
        return None
    return resolve_preset(request, preset)


@dataclass
class LayerParams(AssetsExprParams):
    """``assets``/``expression`` (titiler's), filled from the preset when neither is given."""

    assets: Annotated[  # type: ignore[assignment]
        list[str] | None,
        AfterValidator(lambda v: _parse_asset(v) if v else v),
        Query(
            title="Asset names",
            description="Assets to read, e.g. `ms|bands=nir,red,green` or `ms|bidx=4,3,2`. Default: the preset's.",
        ),
    ] = None
    # the same `preset` query parameter as `PresetParams` (documented there): titiler's WMTS
    # extension checks a layer's query string against this class alone, without sub-dependencies
    preset: Annotated[str | None, Query(include_in_schema=False)] = None
    preset_values: Annotated[Resolved | None, Depends(PresetParams)] = None
    pansharpen: PansharpenSpec | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        """Take the preset's bands unless ``assets`` or ``expression`` were given.

        With neither and no preset (none applies to the data, or titiler's WMTS extension
        checking a layer with no query parameters), there is nothing to read: 400.
        """
        p = self.preset_values
        if p is None and not (self.assets or self.expression or self.preset):
            raise MissingAssets("Give `preset`, `assets` or `expression` (no preset applies to this data)")
        if p is not None and not self.assets and not self.expression:
            self.assets = _parse_asset(list(p.assets)) if p.assets else []
            self.expression = p.expression
            self.pansharpen = p.pansharpen

    def as_dict(self, exclude_none: bool = True) -> dict:
        """Reader options (without the preset itself)."""
        out = super().as_dict(exclude_none)
        out.pop("preset_values", None)
        out.pop("preset", None)
        return out


@dataclass
class RenderParams(ImageRenderingParams):
    """titiler's rendering options; ``rescale`` and ``color_formula`` default to the preset's."""

    preset_values: Annotated[Resolved | None, Depends(PresetParams)] = None

    def __post_init__(self) -> None:
        """Parse, then take the preset's values where the request gave none."""
        super().__post_init__()
        p = self.preset_values
        if p is not None:
            if not self.rescale and p.rescale:
                self.rescale = [tuple(r) for r in p.rescale]  # type: ignore[assignment]
            if not self.color_formula and p.color_formula:
                self.color_formula = p.color_formula

    def as_dict(self, exclude_none: bool = True) -> dict:
        """Render options (without the preset itself)."""
        out = super().as_dict(exclude_none)
        out.pop("preset_values", None)
        return out


def ColorMapParams(  # noqa: N802 - titiler naming
    preset_values: Annotated[Resolved | None, Depends(PresetParams)],
    colormap: Annotated[Any, Depends(TitilerColorMapParams)],
) -> Any:
    """Titiler's ``colormap_name``/``colormap``, else the preset's colormap."""
    if colormap is not None or preset_values is None:
        return colormap
    if preset_values.colormap_name:
        return default_cmap.get(preset_values.colormap_name)
    if preset_values.colormap:
        return TitilerColorMapParams(colormap_name=None, colormap=preset_values.colormap)
    return None


def data_zooms(pool: Any, search_id: str, tms: Any) -> tuple[int, int] | None:
    """Zoom range of a search mosaic in ``tms`` (see `collection_zooms`)."""
    return collection_zooms(pool, search_collection_ids(pool, search_id), tms)


def collection_zooms(pool: Any, collections: Sequence[str], tms: Any) -> tuple[int, int] | None:
    """Zoom range of a mosaic of ``collections`` in ``tms``, from its newest item (rio-tiler's rule).

    maxzoom: the zoom whose resolution matches the item's finest asset (the pan band);
    minzoom: the zoom where the item's coarsest overview fits one tile. Needs the
    projection extension on the item; None without it. Cached 60 s.
    """

    def fetch() -> tuple[int, int] | None:
        query = {
            "collections": list(collections),
            "limit": 1,
            "sortby": [{"field": "datetime", "direction": "desc"}],
        }
        with pool.connection() as conn:
            row = conn.execute("SELECT pgstac.search(%s::jsonb)", (json.dumps(query),)).fetchone()
        features = (row[0] or {}).get("features", []) if row else []
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

    return _cached(("zooms", tuple(collections), tms.id), fetch)


def newest_item(pool: Any, search_id: str) -> tuple[str, str] | None:
    """(collection/id, datetime) of the newest item of a search mosaic (cached 60 s), for ETags."""

    def fetch() -> tuple[str, str] | None:
        collections = search_collection_ids(pool, search_id)
        query = {
            "collections": list(collections),
            "limit": 1,
            "sortby": [{"field": "datetime", "direction": "desc"}],
            "fields": {"include": ["id", "collection", "properties.datetime", "properties.updated"]},
        }
        with pool.connection() as conn:
            row = conn.execute("SELECT pgstac.search(%s::jsonb)", (json.dumps(query),)).fetchone()
        features = (row[0] or {}).get("features", []) if row else []
        if not features:
            return None
        f = features[0]
        props = f.get("properties") or {}
        return f"{f.get('collection')}/{f.get('id')}", str(props.get("updated") or props.get("datetime"))

    return _cached(("newest", search_id), fetch)
