"""Settings, one pydantic-settings class per concern.

Environment variables (see docs/settings.md):

* ``TILER_API_*``: the HTTP application.
* ``DATABASE_URL`` or ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD``/``PGDATABASE``:
  the pgstac database; ``TILER_DB_*``: its connection pool.
* ``TILER_COG_*``: the ``/cog`` endpoints for COGs given by URL (off by default).
* ``TILER_EXTERNAL_*``: the ``/external`` endpoints for items of other STAC catalogues (off by default).
* ``TILER_GDAL_*``: GDAL configuration used for every read.
* ``TILER_AUTH_*``: who may see what (identity provider, API keys, policy,
  signed URL tokens).
* ``TILER_UPSTREAM_*``: credentials the server presents to COG hosts.
* ``TILER_CACHE_*``: the cache of rendered tiles (in-process, and optionally a shared Redis).
* ``TILER_METRICS_*``, ``TILER_LOG_FORMAT``: Prometheus metrics and logs.
* ``TILER_LIMIT_*``: caps on every size a caller controls (tiles, previews,
  exports, statistics, expressions, CQL2 filters, mosaic searches).
* ``PORT``, ``COG_PORT``, ``PG_PORT``: the ports of ``tiler demo``.

titiler-pgstac reads a few of its own variables (``TITILER_PGSTAC_CACHE_*``,
``TITILER_PGSTAC_SEARCH_*``, ``MOSAIC_CONCURRENCY``); they keep working.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_csv(v: object) -> object:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


class ApiSettings(BaseSettings):
    """The HTTP application."""

    name: str = "dinamis-tiler"
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated list of allowed CORS origins (`*`: any); empty (default): no CORS headers.",
    )
    cachecontrol: str = Field(
        default="public, max-age=3600",
        description="Cache-Control header for successful tile/image responses.",
    )
    request_timeout: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Deadline of every request, seconds: past it the answer is a 504 and readers stop. "
            "GDAL's HTTP timeouts must fit under it (checked at start-up)."
        ),
    )
    root_path: str = ""
    debug: bool = False
    enable_assets_endpoints: bool = True
    readiness_probe_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated http(s) URLs on the COG storage that `/readyz` probes (a 1-byte range "
            "GET, without credentials: any answer below 500, 401/403 included, counts as reachable)."
        ),
    )
    readiness_probe_timeout: float = Field(
        default=2.0, gt=0, le=30, description="Seconds each storage probe may take."
    )
    readiness_cache_ttl: float = Field(
        default=5.0, ge=0, description="Seconds a storage probe result is reused by `/readyz`."
    )
    max_renders: int = Field(
        default_factory=lambda: 2 * (os.cpu_count() or 1),
        ge=1,
        description="Renders (requests that read pixels) in flight per worker; default 2 x cores.",
    )
    render_queue: int = Field(
        default=16,
        ge=0,
        description="Renders that may wait for a slot; past it the answer is 503 with Retry-After at once.",
    )
    queue_timeout: float = Field(
        default=5.0, gt=0, description="Seconds a queued render waits for a slot before a 503."
    )

    model_config = SettingsConfigDict(env_prefix="TILER_API_", extra="ignore")

    _split = field_validator("cors_origins", "readiness_probe_urls", mode="before")(_split_csv)

    @field_validator("readiness_probe_urls")
    @classmethod
    def _check_probe_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
                raise ValueError(
                    "TILER_API_READINESS_PROBE_URLS entries must be http(s) URLs with a host and no "
                    "user info (for s3:// storage give the bucket's https endpoint)"
                )
        return urls


class DatabaseSettings(BaseSettings):
    """The pgstac database and the connection pool.

    ``DATABASE_URL`` wins; otherwise the libpq variables ``PG*`` are used.
    """

    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    pghost: str | None = Field(default=None, validation_alias="PGHOST")
    pgport: int = Field(default=5432, validation_alias="PGPORT")
    pguser: str | None = Field(default=None, validation_alias="PGUSER")
    pgpassword: SecretStr | None = Field(default=None, validation_alias="PGPASSWORD")
    pgdatabase: str | None = Field(default=None, validation_alias="PGDATABASE")

    min_conn: int = Field(default=1, ge=0, validation_alias="TILER_DB_MIN_CONN")
    max_conn: int = Field(default=10, ge=1, validation_alias="TILER_DB_MAX_CONN")
    pool_timeout: float = Field(
        default=10.0,
        gt=0,
        validation_alias="TILER_DB_POOL_TIMEOUT",
        description="Seconds a request may wait for a connection before a 503.",
    )
    max_idle: float = Field(default=300.0, validation_alias="TILER_DB_MAX_IDLE")
    connect_timeout: int = Field(default=5, ge=1, validation_alias="TILER_DB_CONNECT_TIMEOUT")
    workers: int = Field(
        default=1,
        ge=1,
        validation_alias="TILER_DB_WORKERS",
        description="Worker processes per replica sharing the database (`tiler serve --workers` sets it).",
    )
    replicas: int = Field(
        default=1, ge=1, validation_alias="TILER_DB_REPLICAS", description="Replicas (pods) of the tiler."
    )
    other_connections: int = Field(
        default=0,
        ge=0,
        validation_alias="TILER_DB_OTHER_CONNECTIONS",
        description="Connections other clients (ingest, admin, another STAC API) need on the same server.",
    )
    strict_budget: bool = Field(
        default=False,
        validation_alias="TILER_DB_STRICT_BUDGET",
        description="Refuse to start when the pools could exceed the server's max_connections.",
    )
    mosaic_search: Literal["tiler", "pgstac"] = Field(
        default="tiler",
        validation_alias="TILER_DB_MOSAIC_SEARCH",
        description=(
            "How a mosaic tile finds its items. `tiler`: `tiler_mosaic.geometrysearch` (pgstac's "
            "geometrysearch without its per-call temporary table and notices, items hydrated in the "
            "worker; installed by `tiler migrate` or at first use), falling back to pgstac's when "
            "missing or on another pgstac minor version. `pgstac`: `pgstac.geojsonsearch`, as "
            "titiler-pgstac does."
        ),
    )

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="after")
    def _check_pool(self) -> DatabaseSettings:
        if self.min_conn > self.max_conn:
            raise ValueError("TILER_DB_MIN_CONN must not exceed TILER_DB_MAX_CONN")
        return self

    @property
    def dsn(self) -> str:
        """Libpq connection string (contains the password: never log it)."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        auth = ""
        if self.pguser:
            auth = quote(self.pguser, safe="")
            if self.pgpassword is not None:
                auth += ":" + quote(self.pgpassword.get_secret_value(), safe="")
            auth += "@"
        host = self.pghost or "localhost"
        return f"postgresql://{auth}{host}:{self.pgport}/{self.pgdatabase or ''}"

    @property
    def redacted_dsn(self) -> str:
        """The DSN without password, for logs and the health endpoint."""
        parts = urlsplit(self.dsn)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
        return f"{parts.scheme}://{user}{host}{port}{parts.path}"


class CogSettings(BaseSettings):
    """``/cog`` endpoints: COGs given by URL, restricted to an allow-list."""

    enabled: bool = False
    allowed_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated URL prefixes a `url=` must start with, e.g. "
            "`https://data.example.org/cogs/`. Private and loopback hosts are "
            "refused unless written as an IP literal in a prefix."
        ),
    )

    model_config = SettingsConfigDict(env_prefix="TILER_COG_", extra="ignore")

    _split = field_validator("allowed_prefixes", mode="before")(_split_csv)

    @model_validator(mode="after")
    def _need_prefixes(self) -> CogSettings:
        if self.enabled and not self.allowed_prefixes:
            raise ValueError("TILER_COG_ENABLED=true needs TILER_COG_ALLOWED_PREFIXES")
        return self


class ExternalSettings(BaseSettings):
    """``/external`` endpoints: items of other STAC catalogues given by URL, restricted to an allow-list."""

    enabled: bool = False
    allowed_prefixes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated catalogue URL prefixes: the item `url=` and every asset href of the item "
            "must start with one (same rules as `TILER_COG_ALLOWED_PREFIXES`)."
        ),
    )
    item_max_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest STAC item document read from a catalogue, bytes (a larger one is a 400).",
    )
    item_timeout: float = Field(
        default=5.0, gt=0, le=60, description="Seconds the fetch of one STAC item may take in all."
    )
    item_cache_ttl: float = Field(
        default=60.0, ge=0, description="Seconds a fetched item is reused (0: fetched on every request)."
    )
    item_cache_mb: float = Field(
        default=16, gt=0, description="Memory of the kept items, MiB of their JSON, per worker (LRU past it)."
    )
    item_max_assets: int = Field(
        default=256,
        ge=1,
        le=10000,
        description="Assets (and alternate hrefs) of one item at most (400 beyond).",
    )

    model_config = SettingsConfigDict(env_prefix="TILER_EXTERNAL_", extra="ignore")

    _split = field_validator("allowed_prefixes", mode="before")(_split_csv)

    @field_validator("allowed_prefixes")
    @classmethod
    def _check_prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https", "s3") or not parts.hostname or "@" in parts.netloc:
                raise ValueError(
                    "TILER_EXTERNAL_ALLOWED_PREFIXES entries must be http(s):// or s3:// URLs with a host "
                    "and no user info"
                )
        return prefixes

    @model_validator(mode="after")
    def _need_prefixes(self) -> ExternalSettings:
        if self.enabled and not self.allowed_prefixes:
            raise ValueError("TILER_EXTERNAL_ENABLED=true needs TILER_EXTERNAL_ALLOWED_PREFIXES")
        return self


class GdalSettings(BaseSettings):
    """GDAL configuration for remote COG reads (applied with rasterio.Env per request).

    The HTTP options are the values titiler and GDAL recommend for COGs on HTTP
    object storage; each can be overridden by ``TILER_GDAL_<NAME>``. The two caches are
    per worker process and sized so that a worker stays below stock titiler-pgstac's peak
    memory at the same throughput on distinct tiles (``make bench``, docs/performance.md):
    datasets are kept open between requests, so these caches do fill, unlike stock's.
    """

    gdal_disable_readdir_on_open: str = "EMPTY_DIR"
    cpl_vsil_curl_allowed_extensions: str = ".tif,.TIF,.tiff,.TIFF"
    gdal_http_merge_consecutive_ranges: str = "YES"
    gdal_http_multiplex: str = "YES"
    gdal_http_version: str = "2"
    gdal_ingested_bytes_at_open: str = "32768"
    gdal_http_timeout: str = "8"
    gdal_http_connecttimeout: str = "3"
    gdal_http_max_retry: str = "2"
    gdal_http_retry_delay: str = "0.5"
    gdal_http_retry_codes: str = "429,500,502,503,504"
    gdal_http_low_speed_time: str = "5"
    gdal_http_low_speed_limit: str = "1024"
    vsi_cache: str = "TRUE"
    vsi_cache_size: str = "5000000"
    gdal_cachemax: int = Field(default=32, ge=1, description="GDAL block cache, MB (process-wide).")
    cpl_vsil_curl_cache_size: str = "32000000"

    model_config = SettingsConfigDict(env_prefix="TILER_GDAL_", extra="ignore")

    def options(self) -> dict[str, str | int]:
        """GDAL config options keyed by their GDAL names.

        ``GDAL_CACHEMAX`` is given in bytes: rasterio hands an integer straight to
        ``GDALSetCacheMax64``, so ``200`` would mean a 200-byte block cache.
        """
        out: dict[str, str | int] = {k.upper(): v for k, v in self.model_dump().items()}
        out["GDAL_CACHEMAX"] = self.gdal_cachemax * 1024 * 1024
        return out

    def env_options(self) -> dict[str, str | int]:
        """The options for a ``rasterio.Env`` around reads: all but ``GDAL_CACHEMAX``.

        GDAL's block cache bound is process-wide: ``rasterio.Env`` sets it on entry and puts
        the previous value (GDAL's default, 5 % of RAM) back on exit, so with concurrent
        requests the bound flipped between the two and the cache outgrew the setting.
        `tiler.process.configure_process` sets it once per process instead.
        """
        out = self.options()
        del out["GDAL_CACHEMAX"]
        return out

    def worst_http_seconds(self) -> float:
        """Longest one HTTP request of GDAL can take, retries included.

        Each attempt is cut at ``GDAL_HTTP_TIMEOUT``; GDAL waits ``GDAL_HTTP_RETRY_DELAY``
        before the first retry and multiplies the delay by at most 2.5 for each next one.
        """
        try:
            timeout = float(self.gdal_http_timeout)
            retries = int(self.gdal_http_max_retry)
            delay = float(self.gdal_http_retry_delay)
        except ValueError as e:
            raise ValueError(
                f"TILER_GDAL_GDAL_HTTP_TIMEOUT/MAX_RETRY/RETRY_DELAY must be numbers: {e}"
            ) from None
        if timeout <= 0:
            return float("inf")  # 0 means no timeout in GDAL
        return (retries + 1) * timeout + sum(delay * 2.5**k for k in range(retries))


class ReaderSettings(BaseSettings):
    """How COGs are read and tiles encoded, per worker process."""

    pool_size: int = Field(
        default=32,
        ge=0,
        le=4096,
        description=(
            "Open datasets kept between requests (0: open and close every file per request). "
            "A kept dataset keeps its decoded blocks and parsed TIFF directories."
        ),
    )
    pool_per_file: int = Field(default=4, ge=1, le=64, description="Kept datasets of one file at most.")
    pool_ttl: float = Field(
        default=300,
        gt=0,
        description="Seconds a kept dataset may stay idle (a file replaced at the same URL is seen after that).",
    )
    png_zlevel: int = Field(
        default=1,
        ge=1,
        le=9,
        description=(
            "Deflate level of PNG output. With the libdeflate encoder, 1 encodes a 256 px RGBA tile "
            "of textured imagery in ~2 ms, 6 (titiler's) in ~5.5 ms for PNGs ~7 % smaller."
        ),
    )
    png_encoder: Literal["libdeflate", "gdal"] = Field(
        default="libdeflate",
        description=(
            "Who writes PNG tiles: `libdeflate` (`tiler.png`: libpng's row filters in numpy, "
            "libdeflate; against GDAL at the same level ~2x faster at 1, ~3x at 6, ~5 % smaller) or `gdal` "
            "(rio-tiler's render through GDAL's PNG driver). The decoded pixels are the same."
        ),
    )

    known_size_opener: bool = Field(
        default=True,
        description=(
            "Read HTTP(S) assets whose STAC item gives `file:size` through the server's own range "
            "reader (`tiler.opener`): no size probe (HEAD) before the first range, the header "
            "(`file:header_size`) in one GET: a cold tile costs 2 origin requests instead of 3. "
            "false: GDAL's /vsicurl/ for every file."
        ),
    )

    direct_overviews: bool = Field(
        default=True,
        description=(
            "Reprojected reads that GDAL would serve from an overview are warped from that overview "
            "level alone (`tiler.overviewread`): the same pixels without GDAL building a warped VRT "
            "for every overview of the file on every tile. false: rio-tiler's read."
        ),
    )

    multirange: bool = Field(
        default=True,
        description=(
            "With the known-size reader: blocks of a tile that lie in separate parts of a file are "
            "asked in one GET with several ranges (`multipart/byteranges`, as nginx and Apache serve "
            "them) instead of one GET per part. A host that answers otherwise (S3 and most object "
            "stores: the whole file, the first range or a 416) is remembered per process and gets one "
            "GET per part, sent in parallel. false: always one GET per part."
        ),
    )

    allocator: Literal["jemalloc", "glibc"] = Field(
        default="jemalloc",
        description=(
            "malloc of the server's processes (`tiler.allocator`). `jemalloc`: `tiler serve` and "
            "`tiler demo` start again once with libjemalloc preloaded (Debian: libjemalloc2; the "
            "Docker image preloads it itself), which reuses freed buffers instead of faulting fresh "
            "pages in for each tile (~25 % of a worker's CPU on distinct tiles under glibc with the "
            "fixed mmap threshold) while RSS stays flat. `glibc`: glibc's malloc with the two "
            "settings below. Without the library installed, glibc (logged)."
        ),
    )

    jemalloc_conf: str = Field(
        default="background_thread:true,narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:4194304",
        description=(
            "`MALLOC_CONF` given to jemalloc when it is preloaded and the variable is not set: two "
            "arenas per process, freed pages handed back after 1 s by a background thread, "
            "allocations over 4 MiB (previews, statistics, low zooms) never kept for reuse."
        ),
    )

    malloc_arena_max: int = Field(
        default=2,
        ge=0,
        le=64,
        description=(
            "glibc malloc arenas per worker process (0: glibc's default, 8 x cores; ignored under "
            "jemalloc). Render threads "
            "each get an arena by default; measured on the soak, 2 arenas keep ~160 MiB less per "
            "worker after 5 min at the same throughput."
        ),
    )

    malloc_mmap_threshold_kb: int = Field(
        default=128,
        ge=0,
        le=32768,
        description=(
            "glibc (ignored under jemalloc): allocations of this many KiB and more get their own mmap, "
            "returned to the system "
            "when freed (0: glibc's default, a threshold that rises up to 32 MiB as large blocks are "
            "freed, after which GDAL blocks and tile arrays fragment the heap). Measured on the "
            "10-minute soak: RSS per worker flat (+0.2 % over the last 5 minutes against +11 %) and "
            "a ~90 MiB lower peak."
        ),
    )

    model_config = SettingsConfigDict(env_prefix="TILER_READER_", extra="ignore")


class AuthSettings(BaseSettings):
    """Access control: credentials, the rights policy and signed URL tokens.

    With ``enabled`` (the default) a policy file is required and every data
    endpoint checks it; ``TILER_AUTH_ENABLED=false`` serves everything to
    everyone (an open server, e.g. for public imagery).
    """

    enabled: bool = True
    policy_file: str | None = Field(
        default=None, description="YAML or JSON rights policy (groups -> collections). Reloaded on change."
    )
    api_keys_file: str | None = Field(
        default=None, description="YAML or JSON API key store (sha256 of each key -> user, groups)."
    )
    jwks_file: str | None = Field(default=None, description="JSON Web Key Set of the identity provider.")
    jwks_url: str | None = Field(
        default=None, description="JWKS URL of the identity provider (fetched, cached)."
    )
    issuer: str | None = Field(default=None, description="Required `iss` of JWTs.")
    audience: str | None = Field(default=None, description="Required `aud` of JWTs.")
    user_claim: str = "sub"
    groups_claim: str = Field(
        default="groups",
        description="Claim holding the user's groups; dotted path, e.g. `realm_access.roles`.",
    )
    signing_keys: SecretStr | None = Field(
        default=None,
        description=(
            "Secrets for signed URL tokens, `kid:secret` comma-separated. The first signs new "
            "tokens; the others are still accepted (key rotation). Remove a kid to revoke its tokens."
        ),
    )
    token_max_ttl: int = Field(
        default=90 * 86400, gt=0, description="Longest lifetime of a URL token, seconds."
    )
    token_default_ttl: int = Field(default=7 * 86400, gt=0)
    reload_interval: float = Field(
        default=2.0,
        ge=0,
        description="Seconds between checks of the policy/key files and the revocation list.",
    )
    private_cachecontrol: str = "private, max-age=3600"

    model_config = SettingsConfigDict(env_prefix="TILER_AUTH_", extra="ignore")

    @model_validator(mode="after")
    def _need_policy(self) -> AuthSettings:
        if not self.enabled:
            return self
        if not self.policy_file:
            raise ValueError(
                "TILER_AUTH_POLICY_FILE is required while TILER_AUTH_ENABLED is true "
                "(set TILER_AUTH_ENABLED=false for an open server)"
            )
        if self.jwks_file and self.jwks_url:
            raise ValueError("Set TILER_AUTH_JWKS_FILE or TILER_AUTH_JWKS_URL, not both")
        self.keys()  # validate now, fail at start rather than at the first request
        return self

    def keys(self) -> dict[str, bytes]:
        """Signing secrets by key id, in the order given (the first signs)."""
        if self.signing_keys is None:
            return {}
        out: dict[str, bytes] = {}
        for part in self.signing_keys.get_secret_value().split(","):
            kid, sep, secret = part.strip().partition(":")
            if not sep or not kid or len(secret) < 32:
                raise ValueError(
                    "TILER_AUTH_SIGNING_KEYS entries must be `kid:secret` with secrets of 32+ characters"
                )
            out[kid] = secret.encode()
        return out


class UpstreamSettings(BaseSettings):
    """Credentials presented to COG hosts, per URL prefix (never sent elsewhere)."""

    credentials_file: str | None = Field(
        default=None,
        description="YAML or JSON list of {prefix, headers | options | signer}; see docs/access-control.md.",
    )

    model_config = SettingsConfigDict(env_prefix="TILER_UPSTREAM_", extra="ignore")


class StacSettings(BaseSettings):
    """The STAC API (stac-fastapi-pgstac) mounted under ``/stac``, behind the access policy."""

    enabled: bool = Field(default=True, description="Mount the STAC API under `/stac`.")
    asset_token_ttl: int = Field(
        default=3600,
        gt=0,
        description="Lifetime (s) of the URL token in each asset link the STAC API returns (one item, one user).",
    )
    max_conn: int = Field(default=4, ge=1, description="asyncpg connections of the STAC API, per worker.")
    max_items: int = Field(
        default=500,
        ge=1,
        description="Items per page at most (a larger `limit` is lowered; `next` links page on).",
    )

    model_config = SettingsConfigDict(env_prefix="TILER_STAC_", extra="ignore")


class StreamSettings(BaseSettings):
    """Raw COG streaming (`/stream/...`, the STAC API's asset links)."""

    max_per_user: int = Field(default=16, ge=1, description="Open streams of one caller, per worker.")
    max_total: int = Field(
        default=256, ge=1, description="Open streams of one worker (and storage connections)."
    )
    connect_timeout: float = Field(default=3.0, gt=0, description="Seconds to connect to the storage host.")
    read_timeout: float = Field(
        default=8.0,
        gt=0,
        description="Seconds the storage host may stay silent (first byte, then each chunk).",
    )
    chunk_kb: int = Field(default=64, ge=4, le=4096, description="Relay chunk size, KiB.")

    model_config = SettingsConfigDict(env_prefix="TILER_STREAM_", extra="ignore")

    @property
    def chunk_bytes(self) -> int:
        """The chunk size in bytes."""
        return self.chunk_kb * 1024


class SecureLinkSettings(BaseSettings):
    """The ``tiler.signers:secure_link`` signer: presigned URLs checked by nginx's secure_link module."""

    secret: SecretStr | None = Field(
        default=None, description="Secret shared with the storage's `secure_link_md5` expression."
    )
    ttl: int = Field(
        default=300,
        ge=30,
        le=86400,
        description="Seconds a presigned URL stays valid (GDAL reuses it until then).",
    )

    model_config = SettingsConfigDict(
        env_prefix="TILER_SECURE_LINK_", extra="ignore", hide_input_in_errors=True
    )


def _redis_url(url: SecretStr | None, name: str) -> SecretStr | None:
    """A Redis URL (``redis://``, ``rediss://``, ``unix://``) stripped, None when empty; the error never echoes it."""
    if url is None or not url.get_secret_value().strip():
        return None
    if urlsplit(url.get_secret_value().strip()).scheme not in ("redis", "rediss", "unix"):
        # the value may hold a password: never echo it
        raise ValueError(f"{name} must be a redis://, rediss:// or unix:// URL")
    return SecretStr(url.get_secret_value().strip())


class ExportSettings(BaseSettings):
    """AOI exports on the scene's own grid (``.../export.tif``): the cap of a direct answer.

    Past a cap the answer is a 400 that states it and points to a job or the raw streams;
    an export is never downsampled to fit.
    """

    max_size: int = Field(
        default=8192, ge=1, description="Longer side of a direct export, output pixels (400 beyond)."
    )
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Output pixels (width x height) of a direct export (400 beyond).",
    )

    model_config = SettingsConfigDict(env_prefix="TILER_EXPORT_", extra="ignore")


class JobSettings(BaseSettings):
    """Asynchronous exports (rq jobs on Redis): off unless ``redis_url`` is set.

    ``redis_url`` may carry a password: it is a secret, never logged or shown.
    """

    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis of the job queue (`redis://[:password@]host:port/db`, `rediss://`, `unix://`). Unset: no jobs.",
    )
    queue: str = Field(
        default="dinamis-tiler-exports",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name of the rq queue (the API and every `tiler worker` must agree).",
    )
    results_dir: Path | None = Field(
        default=None,
        description="Directory of the finished files, shared by the API and the workers (required with `redis_url`).",
    )
    max_per_user: int = Field(default=2, ge=1, description="Queued or running jobs of one user (429 beyond).")
    max_size: int = Field(default=40000, ge=1, description="Longer side of a job's export, output pixels.")
    max_pixels: int = Field(
        default=20000 * 20000, ge=1, description="Output pixels (width x height) of a job's export."
    )
    result_ttl: int = Field(
        default=86400, ge=1, description="Seconds a finished job and its file are kept (then deleted)."
    )
    job_timeout: int = Field(
        default=3600, ge=1, description="Seconds a job may run before the worker stops it."
    )
    admin_groups: Annotated[list[str], NoDecode] = Field(
        default=[], description="Comma-separated groups that may see and download every user's jobs."
    )

    # hide_input_in_errors: a refused value may hold a password, errors must not echo it
    model_config = SettingsConfigDict(env_prefix="TILER_JOBS_", extra="ignore", hide_input_in_errors=True)

    _split = field_validator("admin_groups", mode="before")(_split_csv)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: SecretStr | None) -> SecretStr | None:
        return _redis_url(url, "TILER_JOBS_REDIS_URL")

    @model_validator(mode="after")
    def _needs_results_dir(self) -> JobSettings:
        if self.redis_url is not None and self.results_dir is None:
            raise ValueError("TILER_JOBS_RESULTS_DIR is required when TILER_JOBS_REDIS_URL is set")
        return self

    @property
    def enabled(self) -> bool:
        """True when a Redis is configured."""
        return self.redis_url is not None


class TileCacheSettings(BaseSettings):
    """The cache of rendered tiles: one in-process LRU per worker, then an optional shared Redis.

    ``redis_url`` may carry a password: it is a secret, never logged or shown (the logs
    name the host only).
    """

    enabled: bool = True
    max_mb: float = Field(
        default=16, gt=0, description="Memory the cache may hold per worker process, MiB (LRU past it)."
    )
    ttl: float = Field(
        default=300, gt=0, description="Seconds a rendered tile is served again before it is rendered anew."
    )
    max_entry_kb: float = Field(default=2048, gt=0, description="Larger answers (KiB) are not kept.")
    redis_url: SecretStr | None = Field(
        default=None,
        description=(
            "Shared tier for every worker and replica: `redis://[:password@]host:port/db`, `rediss://...` "
            "(TLS) or `unix:///path?db=0`. Needs the `redis` extra. Unset: in-process cache only."
        ),
    )
    redis_prefix: str = Field(
        default="dinamis-tiler",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of the keys in Redis (several deployments may share one Redis).",
    )
    redis_timeout: float = Field(
        default=0.25,
        gt=0,
        le=5,
        description="Seconds a Redis connect, read or write may take before the tier is skipped.",
    )
    redis_backoff: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="Seconds Redis is skipped after a failure before it is tried again.",
    )

    # hide_input_in_errors: a refused value may hold a password, errors must not echo it
    model_config = SettingsConfigDict(env_prefix="TILER_CACHE_", extra="ignore", hide_input_in_errors=True)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: SecretStr | None) -> SecretStr | None:
        return _redis_url(url, "TILER_CACHE_REDIS_URL")


class ObservabilitySettings(BaseSettings):
    """Prometheus metrics at ``/metrics`` and the log format."""

    metrics_enabled: bool = Field(default=True, description="Serve `/metrics` (Prometheus text format).")
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token that opens `/metrics` from any address (`Authorization: Bearer <token>`).",
    )
    metrics_allow: Annotated[list[str], NoDecode] = Field(
        default=["127.0.0.0/8", "::1/128"],
        description="Comma-separated networks that may read `/metrics` without the token.",
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="`json`: one JSON object per line; `text`: human-readable lines."
    )
    prometheus_multiproc_dir: str | None = Field(
        default=None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description="prometheus_client's multiprocess directory (several workers): `/metrics` sums them.",
    )

    model_config = SettingsConfigDict(env_prefix="TILER_", extra="ignore", populate_by_name=True)

    _split = field_validator("metrics_allow", mode="before")(_split_csv)

    @field_validator("metrics_allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad entry
        return v


class LimitSettings(BaseSettings):
    """Caps on what a caller may ask for; over a cap the answer is a 400 before any read.

    Mosaic search limits (``scan_limit``, ``items_limit``, ``time_limit``) are not
    refused but clamped: a request asking for more gets the cap.
    """

    max_zoom: int = Field(
        default=30, ge=0, description="Zoom levels: tile `z`, `minzoom`, `maxzoom`, `zooms`."
    )
    max_tilesize: int = Field(default=1024, ge=1, description="`tilesize` of tiles, TileJSON, WMTS, map.")
    max_buffer: float = Field(default=64, ge=0, description="Tile `buffer`, pixels on each side.")
    max_padding: int = Field(default=64, ge=0, description="Tile `padding`, pixels on each side.")
    max_preview_size: int = Field(
        default=2048, ge=1, description="Preview and thumbnail `width`, `height`, `max_size`, `size`."
    )
    max_part_size: int = Field(
        default=4096,
        ge=1,
        description="Longer side of a bbox/feature export (`width`, `height`, `max_size`).",
    )
    max_part_pixels: int = Field(
        default=4096 * 2048,
        ge=1,
        description=(
            "Output pixels (width x height) of a bbox/feature export. Without a size, an export is read "
            "at native resolution up to the largest square within this and `max_part_size`."
        ),
    )
    max_statistics_size: int = Field(
        default=2048, ge=1, description="Statistics `max_size`, `width`, `height` (GET and POST)."
    )
    max_histogram_bins: int = Field(
        default=1000, ge=1, description="`histogram_bins` (count or edges), percentiles `p`, categories `c`."
    )
    max_bands: int = Field(
        default=32, ge=1, description="Bands one request may read: `bidx` values, assets, per-asset bands."
    )
    max_expression_length: int = Field(default=1024, ge=1, description="Characters of an `expression`.")
    max_expression_terms: int = Field(
        default=100, ge=1, description="Operands (band names, numbers, functions) of an `expression`."
    )
    max_filter_bytes: int = Field(
        default=16384, ge=1, description="CQL2 `filter` or `query`, bytes of text/JSON."
    )
    max_filter_depth: int = Field(
        default=20, ge=1, description="Nesting depth of a CQL2 filter or query (JSON objects and arrays)."
    )
    max_filter_items: int = Field(
        default=1000,
        ge=1,
        description="Elements of any list in a search or filter (`in` arrays, `ids`, `collections`, coordinates).",
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1, description="Request body, bytes (413 beyond).")
    max_body_depth: int = Field(default=32, ge=1, description="Nesting depth of a JSON request body.")
    max_scan_limit: int = Field(default=10000, ge=1, description="Mosaic `scan_limit` (clamped).")
    max_items_limit: int = Field(default=100, ge=1, description="Mosaic `items_limit` (clamped).")
    max_time_limit: int = Field(default=5, ge=1, description="Mosaic `time_limit`, seconds (clamped).")

    model_config = SettingsConfigDict(env_prefix="TILER_LIMIT_", extra="ignore")

    @property
    def default_part_max_size(self) -> int:
        """``max_size`` of an export that gives no size: native resolution within both caps."""
        return max(1, min(self.max_part_size, math.isqrt(self.max_part_pixels)))


class Settings(BaseSettings):
    """All settings of one application instance."""

    api: ApiSettings = Field(default_factory=ApiSettings)
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    cog: CogSettings = Field(default_factory=CogSettings)
    external: ExternalSettings = Field(default_factory=ExternalSettings)
    gdal: GdalSettings = Field(default_factory=GdalSettings)
    reader: ReaderSettings = Field(default_factory=ReaderSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    cache: TileCacheSettings = Field(default_factory=TileCacheSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    stac: StacSettings = Field(default_factory=StacSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)

    model_config = SettingsConfigDict(extra="ignore")

    @model_validator(mode="after")
    def _gdal_fits_deadline(self) -> Settings:
        self.check_deadlines()
        return self

    def check_deadlines(self) -> None:
        """A read stuck on a dead host must end (GDAL's timeouts) within the request deadline."""
        worst = self.gdal.worst_http_seconds()
        if worst > self.api.request_timeout:
            raise ValueError(
                f"GDAL's HTTP timeouts allow one request to take {worst:g} s "
                f"((GDAL_HTTP_MAX_RETRY + 1) x GDAL_HTTP_TIMEOUT + retry delays), more than "
                f"TILER_API_REQUEST_TIMEOUT={self.api.request_timeout:g} s: lower TILER_GDAL_GDAL_HTTP_TIMEOUT "
                "or TILER_GDAL_GDAL_HTTP_MAX_RETRY, or raise the deadline"
            )
        if self.external.enabled and self.external.item_timeout >= self.api.request_timeout:
            raise ValueError(
                f"TILER_EXTERNAL_ITEM_TIMEOUT={self.external.item_timeout:g} s must be shorter than "
                f"TILER_API_REQUEST_TIMEOUT={self.api.request_timeout:g} s"
            )


class DemoSettings(BaseSettings):
    """Ports of ``tiler demo`` (``make demo``), all on 127.0.0.1; its command-line options win.

    The short names (``PORT``, ``COG_PORT``, ``PG_PORT``) are meant for
    ``COG_PORT=8091 make demo``.
    """

    port: int = Field(default=8000, ge=1, le=65535, validation_alias="PORT", description="The tile server.")
    cog_port: int = Field(
        default=8081,
        ge=1,
        le=65535,
        validation_alias="COG_PORT",
        description="The COG file server (the sample items' hrefs point to it).",
    )
    pg_port: int = Field(
        default=55432, ge=1, le=65535, validation_alias="PG_PORT", description="The demo's PostgreSQL."
    )

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)
