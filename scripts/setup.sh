#!/usr/bin/env bash
# Install what dinamis-tiler needs on Debian 12: PostgreSQL 15 + PostGIS 3 (system),
# then the Python package in .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# `setup.sh test` also installs the real clients the tests drive: QGIS (Debian's python3-qgis,
# run offscreen by the system python3) with its WMS/XYZ provider, headless Chromium, and
# redis-server (the tests start private instances of it for the shared tile cache), and nginx
# (a private instance with its secure_link module is the presigning storage of the tests).
# libjemalloc2: the malloc `tiler serve` / `tiler demo` preload (TILER_READER_ALLOCATOR, tiler/allocator.py)
packages=(postgresql-15 postgresql-15-postgis-3 python3-venv libjemalloc2)
if [ "${1:-}" = "test" ]; then packages+=(python3-qgis qgis-providers chromium redis-server nginx); fi
need=()
for pkg in "${packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts a system cluster on 5432 when it installs PostgreSQL (and redis-server on
# 6379, nginx on 80, where systemd runs); we never use them.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
