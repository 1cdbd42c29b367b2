"""Signers shipped with the tiler, for the ``signer:`` key of an upstream credential.

A signer is ``callable(href, refresh=False) -> signed href`` (`tiler.upstream`). The one here
presigns for a storage behind nginx's ``secure_link`` module (or any CDN with the same
scheme): the URL carries its expiry and an MD5 over the expiry, the path and a shared secret,
and the storage refuses any other. Storage configuration (nginx, the secret in a file only
nginx and the tiler read)::

    map $args $dt_signature { default ""; "~(^|&)X-Amz-Signature=(?<s>[^&]*)" $s; }
    location /cogs/ {
        secure_link $dt_signature,$arg_Expires;
        secure_link_md5 "$secure_link_expires$uri SECRET";
        if ($secure_link = "")  { return 403; }   # missing or wrong signature
        if ($secure_link = "0") { return 410; }   # expired
    }

The parameters are named ``Expires`` and ``X-Amz-Signature`` on purpose: GDAL (hence QGIS,
rasterio, pyotb) recognises a redirect to such a URL as a presigned one and reads every
following range of the file from it directly until ``Expires``, then asks the tiler's link
again (`tiler.stream`, ``stream: redirect``). For S3 itself, a signer around boto3's
``generate_presigned_url`` does the same (docs/streaming.md).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from urllib.parse import unquote, urlsplit

from tiler.errors import UpstreamFailed
from tiler.settings import SecureLinkSettings


@functools.lru_cache(maxsize=1)
def secure_link_settings() -> SecureLinkSettings:
    """The signer's settings, read once per process (`secure_link_settings.cache_clear()` re-reads)."""
    return SecureLinkSettings()


def secure_link_signature(path: str, expires: int, secret: str) -> str:
    """The signature of nginx's ``secure_link_md5 "$secure_link_expires$uri SECRET"``: base64url MD5."""
    digest = hashlib.md5(f"{expires}{path} {secret}".encode()).digest()  # noqa: S324 (nginx's scheme)
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def secure_link(href: str, refresh: bool = False) -> str:
    """``href`` presigned for ``TILER_SECURE_LINK_TTL`` seconds (``refresh`` signs anew, as always).

    Raises:
        UpstreamFailed: no ``TILER_SECURE_LINK_SECRET`` is configured.

    """
    settings = secure_link_settings()
    if settings.secret is None:
        raise UpstreamFailed("The secure-link signer has no secret configured (TILER_SECURE_LINK_SECRET).")
    expires = int(time.time()) + settings.ttl
    path = unquote(urlsplit(href).path)
    signature = secure_link_signature(path, expires, settings.secret.get_secret_value())
    sep = "&" if "?" in href else "?"
    return f"{href}{sep}Expires={expires}&X-Amz-Signature={signature}"
