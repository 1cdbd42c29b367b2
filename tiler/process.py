"""Process-wide set-up, once per worker: logging, metrics, malloc, GDAL's dataset pool, PNG encoder, inline dependencies, credentials."""

from __future__ import annotations

import logging

from rio_tiler.profiles import img_profiles

from tiler import allocator, datasets, native, opener, overviewread, png, warpcache
from tiler.dependencies import install_inline_dependencies
from tiler.logs import configure_logging, redact_library_logs
from tiler.metrics import ORIGIN
from tiler.settings import Settings
from tiler.upstream import Credential, load_credentials

logger = logging.getLogger(__name__)


def configure_process(settings: Settings) -> list[Credential]:
    """Apply ``settings`` to this process and return the upstream credentials (installed by the lifespan).

    Raises ValueError when the settings contradict each other (deadlines, a ``/cog``
    allow-list overlapping a credential prefix).
    """
    settings.check_deadlines()
    obs = settings.observability
    configure_logging(fmt=obs.log_format, if_unconfigured=True)  # e.g. under gunicorn
    redact_library_logs()
    if obs.metrics_enabled:
        ORIGIN.enable()
    malloc = allocator.active()
    logger.info("malloc: %s (TILER_READER_ALLOCATOR=%s)", malloc, settings.reader.allocator)
    if malloc == "glibc":  # jemalloc (tiler.allocator) needs neither
        datasets.limit_malloc_arenas(settings.reader.malloc_arena_max)
        datasets.fix_malloc_mmap_threshold(settings.reader.malloc_mmap_threshold_kb)
    # process-wide in GDAL: set here once, never per request (GdalSettings.env_options)
    native.set_gdal_cache_max(settings.gdal.options()["GDAL_CACHEMAX"])
    datasets.configure(settings.reader.pool_size, settings.reader.pool_per_file, settings.reader.pool_ttl)
    opener.configure(
        settings.gdal, enabled=settings.reader.known_size_opener, multirange=settings.reader.multirange
    )
    # titiler's render_image lets rio-tiler's profile win over per-call options: set the level there
    img_profiles.data["png"]["zlevel"] = settings.reader.png_zlevel
    png.configure(settings.reader.png_encoder == "libdeflate")
    warpcache.install()
    if settings.reader.direct_overviews:
        overviewread.install()
    else:
        overviewread.uninstall()
    install_inline_dependencies()
    credentials = load_credentials(settings.upstream.credentials_file)
    if settings.cog.enabled:
        for cred in credentials:
            for prefix in settings.cog.allowed_prefixes:
                if cred.prefix.startswith(prefix) or prefix.startswith(cred.prefix):
                    raise ValueError(
                        f"TILER_COG_ALLOWED_PREFIXES entry {prefix!r} overlaps an upstream credential prefix: "
                        "/cog?url= would read protected data with the server's credentials"
                    )
    return credentials
