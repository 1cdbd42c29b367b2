"""Items of other STAC catalogues, by URL (``/external``): fetched, checked, cached.

The DINAMIS metacatalogue shows items that live in other STAC APIs (Pléiades-CNES, IGN).
`ExternalItems.get` turns an item URL into a `pystac.Item` the ``/external`` routes read
like a pgstac item, under the same rules as ``/cog?url=`` (`tiler.urls`):

* the item URL must be ``http(s)://`` under one of ``TILER_EXTERNAL_ALLOWED_PREFIXES``
  (`validate_dataset_url`: no private address unless written as an IP literal in a prefix,
  no ``/vsi``, inline XML, credentials or ``..``);
* the item is fetched without following redirects (a 3xx is a 403), with the upstream
  credentials of its prefix (headers, or a signer, signed again once on 401/403), at most
  ``item_max_bytes`` and ``item_timeout`` seconds in all;
* every asset href (and ``alternate`` href) of the item, made absolute against the item's
  URL, must pass the same check: one that does not refuses the whole item (4xx), so none
  of its files is read;
* the ``renders`` of the item's collection (its ``rel=collection`` link, when allow-listed
  too) are merged under the item's own, so its presets are those a pgstac item would get;
* an item names at most ``item_max_assets`` hrefs; good items are kept ``item_cache_ttl``
  seconds (at most ``item_cache_mb`` of their JSON).

Messages name the item's URL without query string and never carry a credential.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urljoin

import pystac
from cachetools import TTLCache

from tiler.errors import (
    DatasetURLNotAllowed,
    InvalidDatasetURL,
    InvalidExternalItem,
    UpstreamFailed,
    UpstreamNotFound,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tiler.settings import ExternalSettings
from tiler.upstream import headers_for, signer_for
from tiler.urls import display_url, no_redirect_opener, validate_dataset_url

logger = logging.getLogger(__name__)

_OPENER = no_redirect_opener({})
_CHUNK = 64 * 1024


class ExternalItems:
    """Fetches, checks and caches the items of the allow-listed catalogues (one per application)."""

    def __init__(self, settings: ExternalSettings):
        """Allow-list, caps and cache from ``settings``."""
        self.settings = settings
        self.prefixes = tuple(settings.allowed_prefixes)
        self._cache: TTLCache = TTLCache(
            maxsize=int(settings.item_cache_mb * 1024 * 1024),
            ttl=max(settings.item_cache_ttl, 1e-9),
            getsizeof=lambda entry: entry[1],
        )
        self._lock = threading.Lock()

    def get(self, url: str) -> pystac.Item:
        """The checked item at ``url`` (a new `pystac.Item` each call; the document is cached).

        Raises:
            InvalidDatasetURL: the URL (or an asset href) cannot be read by this server (400).
            DatasetURLNotAllowed: not under the allow-list, a private address, a redirect (403).
            InvalidExternalItem: the answer is not a usable STAC item, or is too large (400).
            UpstreamError: the catalogue failed (404, 502, 503, 504).

        """
        validate_dataset_url(url, self.prefixes)
        if not url.lower().startswith(("http://", "https://")):
            raise InvalidDatasetURL("A STAC item URL must be http(s)://")
        with self._lock:
            text = self._cache.get(url, (None,))[0] if self.settings.item_cache_ttl > 0 else None
        if text is None:
            doc = self._with_collection_renders(url, self._checked(url, self._fetch(url)))
            text = json.dumps(doc)
            if self.settings.item_cache_ttl > 0 and len(text) <= self._cache.maxsize:
                with self._lock:
                    self._cache[url] = (text, len(text))
        item = pystac.Item.from_dict(json.loads(text), preserve_dict=False)
        item.set_self_href(url)  # every asset href is absolute already: none moves
        return item

    def forget(self) -> None:
        """Drop the cached items (tests)."""
        with self._lock:
            self._cache.clear()

    # ------------------------------------------------------------------ checks

    def _checked(self, url: str, doc: Any) -> dict:
        """``doc`` as a STAC item whose every href is absolute and allowed; raise otherwise."""
        where = display_url(url)
        if not isinstance(doc, dict) or doc.get("type") != "Feature":
            raise InvalidExternalItem(f"{where} is not a STAC item (a GeoJSON Feature)")
        assets = doc.get("assets")
        if not isinstance(assets, dict) or not assets:
            raise InvalidExternalItem(f"The STAC item at {where} has no assets")
        if not isinstance(doc.get("geometry"), dict):
            raise InvalidExternalItem(f"The STAC item at {where} has no geometry")
        hrefs = sum(1 + len(a.get("alternate") or {}) if isinstance(a, dict) else 1 for a in assets.values())
        if hrefs > self.settings.item_max_assets:
            raise InvalidExternalItem(
                f"The STAC item at {where} has {hrefs} asset hrefs, over the server's limit of "
                f"{self.settings.item_max_assets}"
            )
        for key, asset in assets.items():
            if not isinstance(asset, dict) or not isinstance(asset.get("href"), str):
                raise InvalidExternalItem(f"Asset {key!r} of the STAC item at {where} has no href")
            asset["href"] = self._allowed_href(url, key, asset["href"])
            alternates = asset.get("alternate")
            if isinstance(alternates, dict):
                for name, alt in alternates.items():
                    if isinstance(alt, dict) and isinstance(alt.get("href"), str):
                        alt["href"] = self._allowed_href(url, f"{key} (alternate {name})", alt["href"])
        try:
            pystac.Item.from_dict(json.loads(json.dumps(doc)), preserve_dict=False)
        except Exception as e:  # noqa: BLE001 - provider data: any parse failure is the item's
            raise InvalidExternalItem(
                f"The STAC item at {where} cannot be read ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        return doc

    def _allowed_href(self, item_url: str, key: str, href: str) -> str:
        """The absolute href of asset ``key`` if it is allowed, else the refusal naming the asset."""
        absolute = href if href.lower().startswith(("/vsi", "vsi", "<")) else urljoin(item_url, href.strip())
        try:
            validate_dataset_url(absolute, self.prefixes)
        except (InvalidDatasetURL, DatasetURLNotAllowed) as e:
            raise type(e)(
                f"Asset {key!r} of the STAC item at {display_url(item_url)} is refused, nothing was read: {e}"
            ) from None
        return absolute

    def _with_collection_renders(self, url: str, doc: dict) -> dict:
        """``doc`` with its collection's ``renders`` under its own (which win), as pgstac items get them.

        The collection is the item's ``rel=collection`` link, read only when it is under the
        allow-list too; without it (or when it fails) the item keeps its own renders.
        """
        link = next(
            (
                lk
                for lk in doc.get("links") or []
                if isinstance(lk, dict) and lk.get("rel") == "collection" and isinstance(lk.get("href"), str)
            ),
            None,
        )
        if link is None:
            return doc
        href = urljoin(url, link["href"].strip())
        try:
            validate_dataset_url(href, self.prefixes)
            collection = self._fetch(href)
        except Exception as e:  # noqa: BLE001 - optional: the item renders without its collection's presets
            logger.info("collection of %s not used: %s", display_url(url), type(e).__name__)
            return doc
        renders = collection.get("renders") if isinstance(collection, dict) else None
        if isinstance(renders, dict) and renders:
            props = doc.setdefault("properties", {})
            own = props.get("renders") if isinstance(props.get("renders"), dict) else {}
            props["renders"] = {**renders, **own}
        return doc

    # ------------------------------------------------------------------ fetch

    def _fetch(self, url: str) -> Any:
        """GET the item (no redirects, the prefix's credentials, one re-sign on 401/403), parsed."""
        where = display_url(url)
        signer = signer_for(url)
        headers = {"Accept": "application/geo+json, application/json", "Accept-Encoding": "identity"}
        headers.update(headers_for(url))
        deadline = time.monotonic() + self.settings.item_timeout
        refresh = False
        while True:
            target = signer(url, refresh=refresh) if signer is not None else url
            if not target.lower().startswith(("http://", "https://")):
                raise UpstreamFailed(f"The signer of {where} did not give an http(s) URL")
            try:
                body = self._read(urllib.request.Request(target, headers=headers), deadline, where)
            except urllib.error.HTTPError as e:
                e.close()
                if e.code in (401, 403) and signer is not None and not refresh:
                    logger.info("catalogue refused a signed item URL; signing it again")
                    refresh = True
                    continue
                raise _status_error(e.code, where) from None
            except TimeoutError:
                raise UpstreamTimeout(f"The catalogue did not answer in time for {where}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise UpstreamTimeout(f"The catalogue did not answer in time for {where}") from None
                raise UpstreamFailed(
                    f"Could not fetch {where} from its catalogue: {type(reason).__name__}"
                ) from None
            break
        try:
            return json.loads(body)
        except ValueError:
            raise InvalidExternalItem(f"{where} did not answer with JSON") from None

    def _read(self, request: urllib.request.Request, deadline: float, where: str) -> bytes:
        cap = self.settings.item_max_bytes
        too_large = f"The STAC item at {where} is larger than the server's limit of {cap} bytes"
        with _OPENER.open(request, timeout=max(0.1, deadline - time.monotonic())) as resp:
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise InvalidExternalItem(too_large)
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = resp.read(min(_CHUNK, cap + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > cap:
                    raise InvalidExternalItem(too_large)
        logger.info("fetched STAC item %s (%d bytes)", where, size)
        return b"".join(chunks)


def _status_error(code: int, where: str) -> Exception:
    if 300 <= code < 400:
        return DatasetURLNotAllowed(f"{where} answers with a redirect; redirects are not followed")
    if code in (404, 410):
        return UpstreamNotFound(f"No STAC item at {where} (HTTP {code})", upstream_status=code)
    if code in (401, 403):
        return UpstreamRefused(
            f"The catalogue refused the server's credentials for {where} (HTTP {code})", upstream_status=code
        )
    if code in (429, 503):
        return UpstreamUnavailable(
            f"The catalogue is unavailable for {where} (HTTP {code}); retry later", upstream_status=code
        )
    return UpstreamFailed(f"Could not fetch {where} from its catalogue: HTTP {code}", upstream_status=code)
