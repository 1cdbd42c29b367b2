"""Credentials for COG hosts: per URL prefix, handed to GDAL only for that prefix.

The credentials file (``TILER_UPSTREAM_CREDENTIALS_FILE``, YAML or JSON) is a
list of entries::

    - prefix: https://dinamis.example.org/cogs/
      headers: {Authorization: "Bearer ${DINAMIS_ARCHIVE_TOKEN}"}
    - prefix: s3://spot-archive/
      options: {AWS_ACCESS_KEY_ID: "${S3_KEY}", AWS_SECRET_ACCESS_KEY: "${S3_SECRET}"}
    - prefix: https://signed.example.org/
      signer: mypackage.signing:sign       # callable(href, refresh=False) -> signed href
    - prefix: https://presigned.example.org/
      signer: tiler.signers:secure_link    # a presigning storage (S3, nginx secure_link, a CDN)
      stream: redirect                     # /stream answers 307 to the signed URL (default: proxy)

``${NAME}`` is replaced by the environment variable ``NAME`` so secrets can
stay out of the file. Headers and options are registered with GDAL as
*path-specific* options (``VSISetPathSpecificOption``): GDAL sends them only to
URLs under that prefix, from any thread, and never to another host — unlike a
global or per-request ``rasterio.Env`` setting, which concurrent requests to
other hosts would see. A signer rewrites the href right before GDAL opens it
(the signed URL never reaches a response); when the host answers 401/403 the
href is signed again with ``refresh=True`` and the open retried once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attr
import rasterio
from rasterio.errors import RasterioError, RasterioIOError
from rio_tiler.io import Reader

from tiler import native, opener
from tiler.auth import PolicyError, load_document
from tiler.datasets import POOL
from tiler.deadline import Budget
from tiler.deadline import current as current_budget
from tiler.errors import DeadlineExceeded, RequestCancelled, UpstreamError, classify_upstream, file_label
from tiler.lowzoom import LowZoomMixin

logger = logging.getLogger(__name__)

Signer = Callable[..., str]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DENIED = re.compile(r"HTTP response code: (401|403)\b")


@dataclass(frozen=True)
class Credential:
    """Credentials for hrefs starting with ``prefix``."""

    prefix: str
    headers: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    signer: Signer | None = None
    #: how ``/stream`` serves files under the prefix: ``proxy`` (relayed through this server)
    #: or ``redirect`` (a 307 to the signer's short-lived presigned URL; needs a signer)
    stream: str = "proxy"


def _expand(value: Any, where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise PolicyError(f"{where}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV.sub(sub, str(value))


def _load_signer(spec: str, where: str) -> Signer:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise PolicyError(f"{where}: cannot import signer {spec!r}") from e
    if not callable(fn):
        raise PolicyError(f"{where}: signer {spec!r} is not callable")
    return fn


def parse_credentials(doc: Any) -> list[Credential]:
    """Validate a parsed credentials document."""
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise PolicyError("upstream credentials must be a list of {prefix, headers|options|signer}")
    out = []
    for i, raw in enumerate(doc):
        where = f"upstream credential #{i}"
        if not isinstance(raw, Mapping) or not raw.get("prefix"):
            raise PolicyError(f"{where}: needs a `prefix`")
        unknown = set(raw) - {"prefix", "headers", "options", "signer", "stream"}
        if unknown:
            raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
        prefix = str(raw["prefix"])
        if not re.match(r"^(https?|s3)://[^/]+/", prefix):
            raise PolicyError(f"{where}: prefix must be http(s):// or s3:// with a host and a trailing path")
        headers = {str(k): _expand(v, where) for k, v in (raw.get("headers") or {}).items()}
        for k, v in headers.items():
            if any(c in k + v for c in "\r\n"):
                raise PolicyError(f"{where}: header {k!r} contains a line break")
        options = {str(k).upper(): _expand(v, where) for k, v in (raw.get("options") or {}).items()}
        signer = _load_signer(str(raw["signer"]), where) if raw.get("signer") else None
        stream = str(raw.get("stream") or "proxy")
        if stream not in ("proxy", "redirect"):
            raise PolicyError(f"{where}: `stream` must be proxy or redirect, not {stream!r}")
        if stream == "redirect" and signer is None:
            raise PolicyError(f"{where}: `stream: redirect` needs a `signer` that presigns the href")
        out.append(Credential(prefix, headers, options, signer, stream))
    return out


def load_credentials(path: str | Path | None) -> list[Credential]:
    """Read the credentials file (empty list when none is configured)."""
    return parse_credentials(load_document(path)) if path else []


def gdal_path(prefix: str) -> str:
    """The GDAL virtual path of a URL prefix (what path-specific options are keyed on)."""
    if prefix.startswith("s3://"):
        return "/vsis3/" + prefix[len("s3://") :]
    return "/vsicurl/" + prefix


def clear_http_cache(prefix: str | None = None) -> None:
    """Forget what GDAL cached about remote files (all, or those under ``prefix``).

    GDAL remembers file sizes, blocks and *failures* per URL; after credentials
    change, a cached 401 must not outlive them. The open datasets kept for those
    files (`tiler.datasets.POOL`) are closed too.
    """
    POOL.discard(prefix)
    opener.CHUNKS.discard(prefix)
    native.clear_curl_cache(gdal_path(prefix) if prefix is not None else None)


def install(credentials: list[Credential]) -> None:
    """Register headers and options of each entry for its prefix only."""
    for cred in credentials:
        clear_http_cache(cred.prefix)
        path = gdal_path(cred.prefix)
        if cred.headers:
            native.set_path_option(
                path, "GDAL_HTTP_HEADERS", "\r\n".join(f"{k}: {v}" for k, v in cred.headers.items())
            )
        for k, v in cred.options.items():
            native.set_path_option(path, k, v)
        logger.info("upstream credentials installed for %s", cred.prefix)


def uninstall(credentials: list[Credential]) -> None:
    """Remove what `install` registered (tests, app shutdown)."""
    for cred in credentials:
        path = gdal_path(cred.prefix)
        clear_http_cache(cred.prefix)
        if cred.headers:
            native.set_path_option(path, "GDAL_HTTP_HEADERS", None)
        for k in cred.options:
            native.set_path_option(path, k, None)


# --------------------------------------------------------------------------- signing readers

_signers: list[tuple[str, Signer]] = []
_headers: list[tuple[str, Mapping[str, str]]] = []
_redirects: list[str] = []
_with_options: list[str] = []


def set_signers(credentials: list[Credential]) -> None:
    """Signers and headers by prefix, longest prefix first (process-wide, set at app start).

    GDAL gets the headers as path-specific options (`install`); the headers are also kept
    here for the raw streaming proxy (`tiler.stream`), which reads with its own HTTP client.
    """
    _signers[:] = sorted(((c.prefix, c.signer) for c in credentials if c.signer), key=lambda t: -len(t[0]))
    _headers[:] = sorted(((c.prefix, c.headers) for c in credentials if c.headers), key=lambda t: -len(t[0]))
    _redirects[:] = [c.prefix for c in credentials if c.stream == "redirect"]
    _with_options[:] = [c.prefix for c in credentials if c.options]


def redirects(href: str) -> bool:
    """True when ``/stream`` answers a redirect to the presigned href instead of relaying the bytes.

    The longest matching prefix decides (a ``proxy`` entry under a ``redirect`` one wins).
    """
    matching = [p for p, _ in _signers if href.startswith(p)]
    return bool(matching) and matching[0] in _redirects


def headers_for(href: str) -> dict[str, str]:
    """The credential headers of the longest prefix ``href`` starts with (empty when none)."""
    for prefix, headers in _headers:
        if href.startswith(prefix):
            return dict(headers)
    return {}


def opens_known_size(href: str, size: Any) -> bool:
    """True when ``href`` is read through `tiler.opener` (no size probe) rather than GDAL's /vsicurl/.

    That takes an HTTP(S) href, its size (``file:size``), the opener enabled
    (``TILER_READER_KNOWN_SIZE_OPENER``) and no GDAL ``options`` registered for its prefix
    (the opener sends headers and signs, but applies no other GDAL option), and a size not
    found wrong before (`tiler.opener.WRONG_SIZES`: such files are read through /vsicurl/).
    """
    return (
        opener.CONFIG.enabled
        and isinstance(size, int)
        and size > 0
        and href.startswith(("https://", "http://"))
        and not any(href.startswith(p) for p in _with_options)
        and (href, size) not in opener.WRONG_SIZES
    )


def signer_for(href: str) -> Signer | None:
    """The signer whose prefix ``href`` starts with."""
    for prefix, fn in _signers:
        if href.startswith(prefix):
            return fn
    return None


def _refused(exc: BaseException | None) -> bool:
    """True when GDAL's error (or one it chains) is an HTTP 401/403."""
    seen = 0
    while exc is not None and seen < 10:
        if _DENIED.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _retry_on_refusal(name: str) -> Callable:
    """``super()``'s reader method ``name``: budget checked, failures guarded, re-signed once if refused."""

    @functools.wraps(getattr(Reader, name))
    def method(self: SigningReader, *args: Any, **kwargs: Any) -> Any:
        parent = getattr(super(SigningReader, self), name)
        if self.budget is not None:
            self.budget.check(f"reading {self._asset_label()}")
        with self._upstream_guard():
            try:
                return parent(*args, **kwargs)
            except RasterioIOError as e:
                if self._signer is None or self._known_size or not _refused(e):
                    raise
                logger.info("upstream refused a signed href while reading; signing it again")
                self._open_signed(refresh=True)
                return parent(*args, **kwargs)

    return method


def forget_failure(href: str) -> None:
    """Clear GDAL's cache for ``href`` (all its query strings) so the next read asks the host again.

    GDAL's /vsicurl/ remembers per URL that a file is missing or failed; without this a
    single transient 503 would fail every later request for that file without a request.
    """
    clear_http_cache(href.split("?", 1)[0].split("#", 1)[0])


#: the opener of each dataset opened through `tiler.opener` (pooled datasets keep theirs)
_OPENERS: weakref.WeakKeyDictionary[Any, opener.KnownSizeOpener] = weakref.WeakKeyDictionary()


@attr.s
class SigningReader(LowZoomMixin, Reader):
    """rio-tiler Reader that signs its href and turns storage failures into `UpstreamError`.

    When the host answers 401/403 (a signed href expired), at open or while
    reading, the href is signed again with ``refresh=True`` and the operation
    retried once; a second refusal is raised (502 for the client). Any read
    failure clears GDAL's cache for the file (`forget_failure`) and is raised as
    the `UpstreamError` its HTTP status or curl error says (`classify_upstream`),
    naming ``label`` (``item/asset``) and the file name, never the URL.
    ``budget`` (the request's `tiler.deadline.Budget`; in rio-tiler's worker threads the
    STAC readers pass it) is checked before opening and reading. Tiles much larger
    than the dataset read only the part it covers (`tiler.lowzoom.LowZoomMixin`).
    With ``file_size`` (the STAC ``file:size``) an HTTP(S) file is read through
    `tiler.opener` (no size probe; ``header_size``, the STAC ``file:header_size``,
    fetched whole at open), which signs, re-signs and retries itself.
    """

    label: str | None = attr.ib(default=None, kw_only=True)
    budget: Budget | None = attr.ib(factory=current_budget, kw_only=True)
    file_size: int | None = attr.ib(default=None, kw_only=True)
    header_size: int | None = attr.ib(default=None, kw_only=True)
    _signer: Signer | None = attr.ib(init=False, default=None)
    _href: str | None = attr.ib(init=False, default=None)
    _pooled: Any = attr.ib(init=False, default=None)
    _failed: bool = attr.ib(init=False, default=False)
    _known_size: bool = attr.ib(init=False, default=False)
    _opener: opener.KnownSizeOpener | None = attr.ib(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        """Open the dataset (signed href), or take an idle one from `tiler.datasets.POOL`."""
        href = self.input
        if self.budget is not None:
            self.budget.check(f"opening {self._asset_label()}")
        self._signer = signer_for(href) if isinstance(href, str) and self.dataset is None else None
        if self._signer is not None:
            self._href = href
        self._known_size = (
            self.dataset is None and isinstance(href, str) and opens_known_size(href, self.file_size)
        )
        with self._upstream_guard():
            if self.dataset is None and isinstance(href, str) and POOL.enabled:
                self._pooled = POOL.take(href)
                if self._pooled is not None:
                    self._opener = _OPENERS.get(self._pooled)
                    if self._opener is not None:
                        self._opener.budget, self._opener.error = self.budget, None
                else:
                    self._pooled = self._open(href)
                self.dataset = self._pooled
                self._ctx_stack.callback(self._give_back)
            elif self._signer is not None or self._known_size:
                self.dataset = self._ctx_stack.enter_context(self._open(href))
            super().__attrs_post_init__()

    def _open(self, href: str) -> Any:
        """``rasterio.open`` of ``href``, signed (and signed again once if refused)."""
        if self._known_size:
            assert self.file_size is not None
            self._opener = opener.KnownSizeOpener(
                href,
                self.file_size,
                self.header_size,
                headers=headers_for(href),
                signer=self._signer,
                budget=self.budget,
            )
            try:
                ds = rasterio.open(opener.vsi_path(self._opener))
            except RasterioError:
                if not isinstance(self._opener.error, opener.SizeMismatch):
                    raise
                logger.warning(
                    "%s: %s; read through GDAL's /vsicurl/ instead",
                    self._asset_label(),
                    self._opener.error,
                )
                self._known_size, self._opener = False, None
                return self._open(href)
            _OPENERS[ds] = self._opener  # the opener lives as long as the dataset
            return ds
        if self._signer is None:
            return rasterio.open(href)
        try:
            return rasterio.open(self._signer(href, refresh=False))
        except RasterioIOError as e:
            if not _refused(e):
                raise
            logger.info("upstream refused a signed href at open; signing it again")
            return rasterio.open(self._signer(href, refresh=True))

    def _give_back(self) -> None:
        """At close: the pooled dataset goes back to the pool, unless anything failed."""
        ds, self._pooled = self._pooled, None
        if ds is None:
            return
        if self._failed:
            ds.close()
        else:
            POOL.give(self.input, ds)

    def _asset_label(self) -> str:
        name = file_label(self.input) if isinstance(self.input, str) else "<dataset>"
        return f"{self.label} ({name})" if self.label else name

    @contextlib.contextmanager
    def _upstream_guard(self) -> Iterator[None]:
        try:
            yield
        except UpstreamError:
            raise
        except RasterioError as e:
            self._failed = True  # a GDAL-level failure: do not reuse the dataset
            recorded = opener.take_error(self._opener)
            if recorded is not None:
                self._raise_recorded(recorded, e)
            if not isinstance(e, RasterioIOError):
                raise
            if isinstance(self.input, str):
                forget_failure(self.input)
            raise classify_upstream(e, self._asset_label()) from e
        recorded = opener.take_error(self._opener)
        if recorded is not None:  # GDAL read on (e.g. zeros of a failed multi-range read): not kept
            self._failed = True
            self._raise_recorded(recorded, None)

    def _raise_recorded(self, error: BaseException, gdal_error: BaseException | None) -> None:
        """Raise what `tiler.opener` recorded: its deadline as is, a host failure as an `UpstreamError`."""
        if isinstance(self.input, str):
            forget_failure(self.input)
        if isinstance(error, (DeadlineExceeded, RequestCancelled, UpstreamError)):
            raise error from gdal_error
        if not isinstance(error, opener.OriginError):
            logger.warning("reading %s through the opener failed", self._asset_label(), exc_info=error)
        raise classify_upstream(error, self._asset_label()) from error

    def _open_signed(self, refresh: bool) -> None:
        assert self._signer is not None and self._href is not None
        self._failed = True  # the dataset opened with the expired signature is not reused
        self.dataset = self._ctx_stack.enter_context(rasterio.open(self._signer(self._href, refresh=refresh)))

    tile = _retry_on_refusal("tile")
    part = _retry_on_refusal("part")
    preview = _retry_on_refusal("preview")
    point = _retry_on_refusal("point")
    feature = _retry_on_refusal("feature")
    statistics = _retry_on_refusal("statistics")
    read = _retry_on_refusal("read")
