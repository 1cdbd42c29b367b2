#!/usr/bin/env bash
# What `make bench` needs besides the project's own .venv (scripts/setup.sh):
# nginx (serves the COGs, logs every range) and wrk (load generator) from Debian, and stock
# titiler-pgstac in its own virtual environment, .bench/stock-venv, pinned to the versions the
# project builds on (same rasterio wheel, hence the same GDAL, as ours). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
for pkg in nginx-light wrk redis-server; do
  # any nginx flavour will do
  if [ "$pkg" = nginx-light ] && command -v nginx >/dev/null 2>&1; then continue; fi
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bench setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a system nginx on :80 when it installs it; the benchmark runs its own instance.

STOCK=.bench/stock-venv
PINS=(
  "titiler.pgstac[psycopg-binary]==3.2.0"
  "titiler.core==2.3.0"
  "titiler.mosaic==2.3.0"
  "titiler.extensions==2.3.0"
  "rio-tiler==9.4.12"
  "rasterio==1.4.4"
  "uvicorn==0.54.0"
  "py-spy==0.4.3"
)
stamp=$STOCK/.installed-$(printf '%s\n' "${PINS[@]}" | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "bench setup: installing stock titiler-pgstac in $STOCK"
  PY=${PYTHON:-python3}
  [ -x $STOCK/bin/python ] || $PY -m venv $STOCK
  $STOCK/bin/python -m pip install -q --upgrade pip
  $STOCK/bin/python -m pip install -q "${PINS[@]}"
  rm -f $STOCK/.installed-* && touch "$stamp"
fi
