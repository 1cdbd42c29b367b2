# dinamis-tiler: multi-stage build, non-root runtime, gunicorn with uvicorn workers.
# rasterio wheels bundle GDAL, so the runtime image needs no system GDAL.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY tiler ./tiler
RUN /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install ".[server,redis,jobs]"

FROM python:3.11-slim-bookworm AS runtime
# jemalloc: `tiler exec` preloads it into gunicorn and its workers (TILER_READER_ALLOCATOR, tiler/allocator.py)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2=5.3.0-1 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tiler \
 && useradd --system --uid 10001 --gid tiler --home-dir /nonexistent --shell /usr/sbin/nologin tiler
COPY --from=build /opt/venv /opt/venv
# the export jobs' results (TILER_JOBS_RESULTS_DIR in deploy/compose.yaml): a volume mounted here
# starts with this owner
RUN mkdir -p /srv/exports && chown 10001:10001 /srv/exports
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WEB_CONCURRENCY=2 \
    PORT=8000
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('PORT','8000'), timeout=3)"]
# One process per worker, each with jemalloc (`tiler exec`); each has its own DB pools (TILER_DB_MAX_CONN for tiles + TILER_STAC_MAX_CONN
# for the STAC API at /stac) and GDAL cache.
CMD ["sh", "-c", "exec tiler exec gunicorn 'tiler.main:create_app()' --worker-class uvicorn.workers.UvicornWorker --workers ${WEB_CONCURRENCY} --bind 0.0.0.0:${PORT} --timeout 60 --graceful-timeout 20 --keep-alive 5"]
