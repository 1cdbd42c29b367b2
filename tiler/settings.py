"""Settings, one pydantic-settings class per concern.

Environment variables (see README's table):

* ``TILER_API_*``: the HTTP application.
* ``DATABASE_URL`` or ``PGHOST``/``PGPORT``/``PGUSER``/``PGPASSWORD``/``PGDATABASE``:
  the pgstac database; ``TILER_DB_*``: its connection pool.
* ``TILER_COG_*``: the ``/cog`` endpoints for COGs given by URL (off by default).
* ``TILER_GDAL_*``: GDAL configuration used for every read.

titiler-pgstac reads a few of its own variables (``TITILER_PGSTAC_CACHE_*``,
``TITILER_PGSTAC_SEARCH_*``, ``MOSAIC_CONCURRENCY``); they keep working.
"""

from __future__ import annotations

from typing import Annotated
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
        default=["*"], description="Comma-separated list of allowed CORS origins."
    )
    cachecontrol: str = Field(
        default="public, max-age=3600",
        description="Cache-Control header for successful tile/image responses.",
    )
    root_path: str = ""
    debug: bool = False
    enable_assets_endpoints: bool = True

    model_config = SettingsConfigDict(env_prefix="TILER_API_", extra="ignore")

    _split = field_validator("cors_origins", mode="before")(_split_csv)


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


class GdalSettings(BaseSettings):
    """GDAL configuration for remote COG reads (applied with rasterio.Env per request).

    The defaults are the values titiler and GDAL recommend for COGs on HTTP
    object storage; each can be overridden by ``TILER_GDAL_<NAME>``.
    """

    gdal_disable_readdir_on_open: str = "EMPTY_DIR"
    cpl_vsil_curl_allowed_extensions: str = ".tif,.TIF,.tiff,.TIFF"
    gdal_http_merge_consecutive_ranges: str = "YES"
    gdal_http_multiplex: str = "YES"
    gdal_http_version: str = "2"
    gdal_ingested_bytes_at_open: str = "32768"
    gdal_http_timeout: str = "20"
    gdal_http_connecttimeout: str = "5"
    gdal_http_max_retry: str = "2"
    gdal_http_retry_delay: str = "0.5"
    vsi_cache: str = "TRUE"
    vsi_cache_size: str = "5000000"
    gdal_cachemax: int = 200
    cpl_vsil_curl_cache_size: str = "200000000"

    model_config = SettingsConfigDict(env_prefix="TILER_GDAL_", extra="ignore")

    def options(self) -> dict[str, str | int]:
        """GDAL config options keyed by their GDAL names."""
        return {k.upper(): v for k, v in self.model_dump().items()}


class Settings(BaseSettings):
    """All settings of one application instance."""

    api: ApiSettings = Field(default_factory=ApiSettings)
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    cog: CogSettings = Field(default_factory=CogSettings)
    gdal: GdalSettings = Field(default_factory=GdalSettings)

    model_config = SettingsConfigDict(extra="ignore")
