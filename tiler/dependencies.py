"""FastAPI dependencies: dataset URL allow-list, STAC item and asset lookup, GDAL environment."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Annotated
from urllib.parse import urlsplit

import pystac
from fastapi import Depends, Path, Query
from rasterio.crs import CRS
from rio_tiler.errors import MissingAssets
from starlette.requests import Request
from titiler.pgstac.dependencies import ItemIdParams, get_stac_item
from titiler.pgstac.reader import PgSTACReader

from tiler.errors import AssetNotFound, DatasetURLNotAllowed, InvalidDatasetURL
from tiler.settings import CogSettings, GdalSettings

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
        return validate_dataset_url(url, prefixes)

    return DatasetURL


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
    item = get_stac_item(request.app.state.dbpool, collection_id, item_id)
    asset = item.assets.get(asset_id)
    if asset is None:
        raise AssetNotFound(
            f"Item '{item_id}' has no asset '{asset_id}' (has: {', '.join(sorted(item.assets))})"
        )
    return asset.get_absolute_href() or asset.href
