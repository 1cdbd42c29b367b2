"""URL checks: which dataset URLs GDAL may open, redirects refused, URLs shown without secrets.

* `validate_dataset_url`: the ``/cog`` allow-list (scheme, host, port, path prefix; no
  ``/vsi``, inline XML, credentials or private addresses);
* `refuse_redirects`: one request without following redirects before GDAL (which would);
* `no_redirect_opener`: the urllib opener of those checks and of the readiness probes;
* `display_url`: a URL without user info, query or fragment, for messages and logs.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from cachetools import TTLCache

from tiler.errors import DatasetURLNotAllowed, InvalidDatasetURL

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is an answer: do not follow it (the target may be another host)."""

    def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]  # noqa: D102
        return None  # surface 3xx as an HTTPError instead of following it


def no_redirect_opener(proxies: dict[str, str] | None = None) -> urllib.request.OpenerDirector:
    """A urllib opener that never follows a redirect; ``proxies`` as `urllib.request.ProxyHandler`'s.

    ``{}``: no proxy at all; None: the environment's (``http_proxy``...).
    """
    return urllib.request.build_opener(_NoRedirect(), urllib.request.ProxyHandler(proxies))


_OPENER = no_redirect_opener({})
_checked: TTLCache = TTLCache(maxsize=4096, ttl=300)
_checked_lock = threading.Lock()


def refuse_redirects(url: str, timeout: float = 5.0, headers: Mapping[str, str] | None = None) -> None:
    """Refuse a URL whose host answers with a redirect (GDAL would follow it anywhere).

    GDAL's HTTP client follows redirects and has no setting to stop it, so a
    redirect on an allow-listed host (an "open redirect") could point GDAL at
    a private address. One 1-byte range request, without following
    redirects, is made to the (already validated) URL before GDAL sees it;
    good answers are remembered for 5 minutes. ``headers``: the credentials of the URL's
    prefix (`tiler.upstream.headers_for`), so that a protected host answers as it will to GDAL.
    """
    if not url.lower().startswith(("http://", "https://")):
        return
    with _checked_lock:
        if url in _checked:
            return
    req = urllib.request.Request(url, headers={**(headers or {}), "Range": "bytes=0-0"}, method="GET")
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


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment (they may carry secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
