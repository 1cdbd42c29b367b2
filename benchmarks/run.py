"""``make bench``: dinamis-tiler side by side with stock titiler-pgstac, same data, same run.

What it sets up (everything under ``.bench/``, loopback only, nothing downloaded at run time):

* a private PostgreSQL+PostGIS+pgstac cluster (`tiler.embedded.LocalCluster`, port 55433);
* 3 overlapping SPOT 6/7-like scenes (`tiler.sample.generate`, 4-band uint16 6 m MS 2048 px,
  1.5 m pan 8192 px, 512 px blocks, deflate) in ``.bench/cogs``;
* one nginx over that folder with one server block (port) per reader, each with its own access
  log of request line, Range header, status and bytes sent: the two servers read the same files
  but each through its own port, so origin requests are counted per server;
* the same items loaded twice into pgstac, in collection ``bench-ours`` (hrefs on nginx port
  18081) and ``bench-stock`` (hrefs on 18082); for the catalogue-scale case, collections
  ``scale-small`` (10 items) and ``scale-<N>`` (``--scale-items``, default 1,000,000) with the
  same 3 real scenes plus synthetic footprints spread over France (one SQL insert, ~1 min for
  1M), read by both servers (hrefs on 18083/18084); kept across runs;
* dinamis-tiler (this checkout, access control off) and stock titiler-pgstac 3.2.0
  (``.bench/stock-venv``, GDAL options from titiler's performance-tuning docs) under uvicorn,
  same worker count.

Both servers get the *same* query string for every request (``assets=ms|bidx=3,2,1`` or
``assets=pan``, ``rescale=200,1800``, PNG, 256 px tiles): titiler's own syntax, which ours keeps.
Before measuring, a sample of tiles is fetched from both and the decoded pixels compared.

The low-zoom tile (the finest tile holding the whole collection) and the origin counts are
measured last on fresh single-worker servers: the low-zoom tile with a client timeout
(``--lowzoom-timeout``), then the CPU the server still spends once the client has gone.

Raw COG streaming (``stream``, ``--only stream`` alone in about a minute, no stock server): a
~50 MiB COG (``.bench/cogs/BENCH_STREAM_50MiB.tif``, 4-band uint16 noise, 512 px blocks,
deflate, overviews; made once) in collection ``bench-stream`` (href on nginx port 18085), read
by ``--stream-readers`` (8) keep-alive readers with random aligned 256 KiB-1 MiB ranges, then
whole-file passes in 1 MiB ranges, through our ``/stream/...`` route and from nginx directly
(port 18086; stock titiler-pgstac has no such route), alternated, on a fresh server of ours;
bytes compared with the file first, our workers' RSS sampled throughout (`Bench.stream_case`).

Cases run in alternation (ours, stock, then stock, ours, ...) for ``--rounds`` rounds; each
round uses tiles not requested before in the run (the same tiles for both servers), and the
ratio ours/stock is taken per round, then the median. Prints a table and writes
``benchmarks/results/<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench"
STOCK_VENV = BENCH / "stock-venv"
PG_PORT = 55433
#: ``stream`` is the origin our server's /stream route reads; ``stream-direct`` the one the
#: benchmark client reads directly (same file, separate access logs)
NGINX_PORTS = {
    "ours": 18081,
    "stock": 18082,
    "scale-small": 18083,
    "scale-big": 18084,
    "stream": 18085,
    "stream-direct": 18086,
    "stream-signed": 18088,
}
#: the ``stream-signed`` port is a presigning storage: nginx's secure_link module refuses any
#: URL without a valid signature and expiry (`tiler.signers.secure_link`, ``stream: redirect``)
STREAM_SECRET = "bench-secure-link-secret-0123456789"
#: nginx as a reverse proxy of the ``stream-direct`` port (``--stream-nginx-proxy``): what a proxy
#: written in C reaches on the same cores, the ceiling for any proxy
NGINX_PROXY_PORT = 18087
SERVER_PORTS = {"ours": 18000, "stock": 18001}
COLLECTIONS = {"ours": "bench-ours", "stock": "bench-stock"}
REDIS_PORT = 18090
SCALE = ("scale-small", "scale-big")  # scale-big is named scale-<count> in pgstac
#: every case, in the order they run (``--skip`` / ``--only``)
CASES = ("items", "mosaic", "preview", "zipf", "scale", "origin", "lowzoom", "workers", "stream")
#: the cases run on the shared pair of servers started once (the others start their own)
SHARED_CASES = {"items", "mosaic", "preview", "zipf", "scale"}


def scale_ids(n: int) -> tuple[str, str]:
    """Collection ids of the scale case: one big collection per size, so runs of other sizes keep theirs."""
    return "scale-small", f"scale-{n}"


#: MS scene width (px, 6 m: 12 km; pan 4x): 2048 gives ~20 distinct z14 tiles per round (1024 gave 5)
MS_SIZE = 2048
N_SCENES = 3

MS_RGB = "assets=" + quote("ms|bidx=3,2,1", safe="") + "&rescale=200,1800"
PAN = "assets=pan&rescale=200,1800"

#: GDAL options for stock titiler-pgstac: titiler's "performance tuning" page and the
#: docker-compose of titiler/titiler-pgstac (GDAL_CACHEMAX and VSI_CACHE_SIZE as ours, so
#: memory is compared on equal caches).
STOCK_GDAL = {
    "GDAL_CACHEMAX": "200",
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2",
    "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": "5000000",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
    "PYTHONWARNINGS": "ignore",
}


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


class Proc:
    """A child process in its own session, stopped with its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, cwd: Path | None = None):
        self.name = name
        (BENCH / "logs").mkdir(parents=True, exist_ok=True)
        self.logfile = open(BENCH / "logs" / f"{name}.log", "ab")  # noqa: SIM115
        self.p = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        """Process id."""
        return self.p.pid

    def stop(self) -> None:
        """Stop the process group (TERM, then KILL)."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self.logfile.close()


def ensure_free(port: int) -> None:
    """Refuse to start when something already listens on 127.0.0.1:port (a leftover run)."""
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        if sock.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"127.0.0.1:{port} is already in use (a previous bench still running?)")


def wait_http(port: int, path: str, timeout: float = 60.0) -> None:
    """Wait until ``GET path`` answers 200 on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers 200 on 127.0.0.1:{port}{path}")
        time.sleep(0.25)


def malloc_of(pids: list[int]) -> str:
    """The malloc every process of ``pids`` has loaded (`tiler.allocator.active`), else ``mixed``."""
    from tiler.allocator import active

    found = {active(pid) for pid in pids}
    return found.pop() if len(found) == 1 else "mixed"


def worker_pids(master: int, workers: int) -> list[int]:
    """Uvicorn worker processes of ``master`` (itself when it runs a single worker)."""
    if workers == 1:
        return [master]
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == master and b"resource_tracker" not in cmd:
            pids.append(int(d.name))
    return sorted(pids)


def memory(pid: int) -> dict:
    """VmHWM (peak RSS) and VmRSS of ``pid``, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def start_nginx(cogs: Path, proxy: bool = False) -> Proc:
    """One nginx, one server block per reader, each with its own access log.

    ``proxy``: also a reverse proxy of the ``stream-direct`` port on `NGINX_PROXY_PORT`
    (keep-alive upstream connections, 256 KiB buffers, nothing written to disk), and 2 nginx
    workers instead of 1 so that the proxy and the origin do not share one.
    """
    d = BENCH / "nginx"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    signed = f"""secure_link $dt_signature,$arg_Expires;
      secure_link_md5 "$secure_link_expires$uri {STREAM_SECRET}";
      if ($secure_link = "") {{ return 403; }}
      if ($secure_link = "0") {{ return 410; }}
      """
    servers = "\n".join(
        f"""  server {{
    listen 127.0.0.1:{port};
    root {cogs};
    access_log {d / (name + ".log")} ranges;
    location / {{ {signed if name == "stream-signed" else ""}try_files $uri =404; }}
  }}"""
        for name, port in NGINX_PORTS.items()
    )
    if proxy:
        servers += f"""
  upstream stream_origin {{ server 127.0.0.1:{NGINX_PORTS["stream-direct"]}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{NGINX_PROXY_PORT};
    access_log off;
    location / {{
      proxy_pass http://stream_origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
      proxy_buffer_size 256k;
      proxy_buffers 8 256k;
      proxy_busy_buffers_size 512k;
      proxy_max_temp_file_size 0;
    }}
  }}"""
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = f"""{user}worker_processes {2 if proxy else 1};
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  types {{ image/tiff tif; application/json json; }}
  default_type application/octet-stream;
  sendfile on;
  keepalive_timeout 120;
  keepalive_requests 1000000;
  client_body_temp_path {d / "tmp"};
  proxy_temp_path {d / "tmp"};
  fastcgi_temp_path {d / "tmp"};
  uwsgi_temp_path {d / "tmp"};
  scgi_temp_path {d / "tmp"};
  log_format ranges '$msec $request_method $uri "$http_range" $status $body_bytes_sent';
  map $args $dt_signature {{ default ""; "~(^|&)X-Amz-Signature=(?<s>[^&]*)" $s; }}
{servers}
}}
"""
    (d / "nginx.conf").write_text(conf)
    for name in NGINX_PORTS:
        (d / f"{name}.log").write_text("")
    for port in [*NGINX_PORTS.values(), *([NGINX_PROXY_PORT] if proxy else [])]:
        ensure_free(port)
    exe = shutil.which("nginx") or "/usr/sbin/nginx"  # /usr/sbin is not on every user's PATH
    p = Proc("nginx", [exe, "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"), "-p", str(d)])
    some = next(iter(sorted(cogs.glob("*.tif")))).name
    for name, port in NGINX_PORTS.items():
        if name != "stream-signed":
            wait_http(port, "/" + some, 20)
    return p


class OriginLog:
    """Reads what a reader asked nginx since a mark."""

    def __init__(self, name: str):
        self.path = BENCH / "nginx" / f"{name}.log"
        self.offset = 0

    def mark(self) -> None:
        """Start counting from the end of the log."""
        time.sleep(0.05)
        self.offset = self.path.stat().st_size

    def since(self) -> dict:
        """Requests, HEADs, bytes, files since the mark."""
        time.sleep(0.1)  # nginx writes the line after the response is sent
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            lines = f.read().decode().splitlines()
        reqs = []
        for line in lines:
            parts = line.split()
            if len(parts) < 6:
                continue
            reqs.append(
                {"method": parts[1], "file": parts[2], "range": parts[3].strip('"'), "bytes": int(parts[-1])}
            )
        per_file: dict[str, int] = {}
        for r in reqs:
            per_file[r["file"]] = per_file.get(r["file"], 0) + 1
        return {
            "requests": len(reqs),
            "head": sum(r["method"] == "HEAD" for r in reqs),
            "bytes": sum(r["bytes"] for r in reqs),
            "files": len(per_file),
            "max_per_file": max(per_file.values(), default=0),
            "detail": [
                f"{r['method']} {r['file'].rsplit('_', 1)[-1]} {r['range']} {r['bytes']}" for r in reqs
            ],
        }


# ---------------------------------------------------------------- data


def prepare_data(scale_items: int, scenes: bool = True) -> tuple[object, tuple[dict, list[dict]]]:
    """Cluster and the scenes' COGs (unless ``scenes`` is false); returns (cluster, (collection, items))."""
    from tiler.embedded import LocalCluster
    from tiler.sample import generate

    cluster = LocalCluster(BENCH / "postgres", PG_PORT)
    cluster.start()
    log(f"pgstac {cluster.migrate()} on 127.0.0.1:{PG_PORT}")
    if not scenes:
        return cluster, ({}, [])
    cogs = BENCH / "cogs"
    t = time.monotonic()
    base = "http://127.0.0.1:PORT"
    coll, items = generate(cogs, base, n_scenes=N_SCENES, ms_size=MS_SIZE)
    log(f"{len(items)} scenes ready in {cogs} ({time.monotonic() - t:.0f} s)")
    return cluster, (coll, items)


def collection_docs(coll: dict, items: list[dict], cid: str, port: int) -> tuple[dict, list[dict]]:
    """Copies of the generated documents for collection ``cid``, hrefs on nginx ``port``."""
    text = json.dumps({"c": coll, "i": items}).replace("http://127.0.0.1:PORT", f"http://127.0.0.1:{port}")
    docs = json.loads(text)
    c, its = docs["c"], docs["i"]
    c["id"] = cid
    for it in its:
        it["collection"] = cid
    return c, its


def load_collections(dsn: str, coll: dict, items: list[dict], scale_items: int) -> None:
    """bench-ours, bench-stock, scale-small, scale-big (synthetic items added in SQL)."""
    import psycopg

    from tiler.ingest import load

    stac = BENCH / "stac"
    stac.mkdir(parents=True, exist_ok=True)
    targets = {COLLECTIONS["ours"]: NGINX_PORTS["ours"], COLLECTIONS["stock"]: NGINX_PORTS["stock"]}
    small_id, big_id = scale_ids(scale_items)
    targets.update({small_id: NGINX_PORTS["scale-small"], big_id: NGINX_PORTS["scale-big"]})
    with psycopg.connect(dsn) as conn:
        have = dict(
            conn.execute("SELECT collection, count(*) FROM pgstac.items GROUP BY collection").fetchall()
        )
    # the scenes changed (another MS_SIZE, N_SCENES or sample generator): load everything again
    signature = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()
    signature_file = stac / "items.sha256"
    if not signature_file.exists() or signature_file.read_text() != signature:
        have = {}
    want = {
        COLLECTIONS["ours"]: len(items),
        COLLECTIONS["stock"]: len(items),
        small_id: 10,
        big_id: scale_items,
    }
    for cid, port in targets.items():
        if have.get(cid) == want[cid]:
            continue
        c, its = collection_docs(coll, items, cid, port)
        (stac / f"{cid}.json").write_text(json.dumps(c))
        (stac / f"{cid}.ndjson").write_text("".join(json.dumps(it) + "\n" for it in its))
        t = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM pgstac.items WHERE collection = %s", (cid,))
        # statistics as `tiler ingest` writes them (read through this collection's nginx port)
        load(dsn, [stac / f"{cid}.json", stac / f"{cid}.ndjson"], progress=False, stats=True)
        if cid in (small_id, big_id):
            add_synthetic(dsn, cid, want[cid] - len(items))
        log(f"loaded {want[cid]} items in {cid} ({time.monotonic() - t:.1f} s)")
    signature_file.write_text(signature)


def add_synthetic(dsn: str, cid: str, n: int) -> None:
    """``n`` synthetic items (3 km squares spread over France, away from the real scenes).

    Inserted with one SQL statement into the collection's partition (pgstac dehydrated form: the
    collection's item_assets fill in the rest), then the partition statistics are refreshed as
    pgstac's loader would. Their assets point at the first real scene (never read: no tile asked
    for intersects them).
    """
    import psycopg

    with psycopg.connect(dsn, autocommit=True, options="-c search_path=pgstac,public") as conn:
        row = conn.execute(
            "SELECT id, datetime, content FROM items WHERE collection = %s ORDER BY datetime LIMIT 1", (cid,)
        ).fetchone()
        _, when, content = row
        template = {
            "type": "Feature",
            "stac_version": content.get("stac_version", "1.0.0"),
            "properties": {"datetime": when.isoformat(), "platform": "spot-6", "gsd": 6.0},
            "assets": {k: {"href": v["href"]} for k, v in content["assets"].items()},
            "links": [],
        }
        conn.execute("SELECT setseed(0.42)")
        conn.execute(
            """
            INSERT INTO items (id, geometry, collection, datetime, end_datetime, content)
            SELECT 'SYN_' || lpad(g::text, 7, '0'), ST_MakeEnvelope(x, y, x + 0.04, y + 0.03, 4326),
                   %(cid)s, %(when)s, %(when)s,
                   %(content)s::jsonb || jsonb_build_object('bbox', jsonb_build_array(x, y, x + 0.04, y + 0.03))
            FROM (
              SELECT g, CASE WHEN x BETWEEN 3.0 AND 4.8 AND y BETWEEN 43.0 AND 44.2 THEN x + 2.0 ELSE x END AS x, y
              FROM (SELECT g, -4.5 + random() * 12.0 AS x, 42.5 + random() * 8.4 AS y
                    FROM generate_series(1, %(n)s) g) r
            ) s
            """,
            {"cid": cid, "when": when, "content": json.dumps(template), "n": n},
        )
        part = conn.execute(
            "SELECT tableoid::regclass::text FROM items WHERE collection = %s LIMIT 1", (cid,)
        ).fetchone()[0]
        conn.execute("SELECT update_partition_stats(%s, false, true)", (part.split(".")[-1],))
        conn.execute(f"ANALYZE {part}")


# ---------------------------------------------------------------- raw streaming data

STREAM_FILE = "BENCH_STREAM_50MiB.tif"
STREAM_COLLECTION = "bench-stream"
STREAM_PRESIGNED_COLLECTION = "bench-stream-presigned"
STREAM_ITEM = "BENCH_STREAM_50MiB"
STREAM_ASSET = "data"
#: 4 bands uint16, 2368 px square: ~50 MiB with deflate (12 bits of noise per pixel barely compress)
STREAM_SIZE_PX = 2368
STREAM_VERSION = "1"  # kept in a stamp beside the file: a file made by another version is made again


def make_stream_cog(cogs: Path) -> dict:
    """The ~50 MiB COG of the streaming case in ``cogs`` (made once, kept): path, size, layout.

    4 bands uint16 (a smooth pattern plus 12 bits of noise, so deflate saves little), 512 px
    blocks, deflate, overviews: what GDAL reads through ``/vsicurl/`` in a real session.
    """
    import numpy as np
    import rasterio
    from affine import Affine

    from tiler.sample import CRS_EPSG, header_size, write_cog

    path = cogs / STREAM_FILE
    stamp = path.with_suffix(".stamp")
    want = f"{STREAM_VERSION} {STREAM_SIZE_PX}"
    ok = path.exists() and stamp.exists() and stamp.read_text().split("\n")[0] == want
    if ok:
        ok = stamp.read_text().split("\n")[1] == str(path.stat().st_size)
    if not ok:
        t = time.monotonic()
        cogs.mkdir(parents=True, exist_ok=True)
        n = STREAM_SIZE_PX
        rng = np.random.default_rng(50)
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        base = (800 + 400 * np.sin(xx / 97.0) * np.cos(yy / 131.0)).astype(np.uint16)
        del yy, xx
        data = np.stack([base + rng.integers(1, 4096, size=(n, n), dtype=np.uint16) for _ in range(4)])
        tmp = path.with_suffix(".tmp.tif")
        write_cog(tmp, data, Affine(6.0, 0, 560_000.0, 0, -6.0, 4_850_000.0), ["B0", "B1", "B2", "B3"])
        tmp.replace(path)
        stamp.write_text(f"{want}\n{path.stat().st_size}\n")
        log(f"streaming COG {path.name} written ({time.monotonic() - t:.0f} s)")
    with rasterio.open(path) as src:
        bounds, crs, shape = src.bounds, src.crs, (src.count, src.height, src.width)
        overviews = src.overviews(1)
        blocks = src.block_shapes[0]
        compress = src.compression.value if src.compression else None
    assert crs.to_epsg() == CRS_EPSG
    return {
        "path": path,
        "size": path.stat().st_size,
        "header_size": header_size(path),
        "bounds": list(bounds),
        "shape": shape,
        "blocks": blocks,
        "overviews": overviews,
        "compress": compress,
    }


def stream_docs(info: dict, port: int, collection: str = STREAM_COLLECTION) -> tuple[dict, dict]:
    """STAC collection and item of the streaming COG, its href on nginx ``port``."""
    from rasterio.warp import transform_bounds

    from tiler.sample import CRS_EPSG

    bbox = list(transform_bounds(f"EPSG:{CRS_EPSG}", "EPSG:4326", *info["bounds"]))
    w, s, e, n = bbox
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/file/v2.1.0/schema.json"],
        "id": STREAM_ITEM,
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
        "bbox": bbox,
        "properties": {"datetime": "2024-06-01T10:30:00Z"},
        "links": [],
        "assets": {
            STREAM_ASSET: {
                "href": f"http://127.0.0.1:{port}/{STREAM_FILE}",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "file:size": info["size"],
                "file:header_size": info["header_size"],
            }
        },
    }
    coll = {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection,
        "description": "One ~50 MiB COG for the raw streaming benchmark.",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [["2024-06-01T10:30:00Z", None]]}},
        "links": [],
    }
    return coll, item


def load_stream_collection(dsn: str, info: dict) -> None:
    """Collections ``bench-stream`` and ``bench-stream-presigned``, upserted each run.

    ``bench-stream``'s href is on nginx's ``stream`` port (proxied by /stream),
    ``bench-stream-presigned``'s on the presigning ``stream-signed`` port (redirected).
    """
    from tiler.ingest import load

    stac = BENCH / "stac"
    stac.mkdir(parents=True, exist_ok=True)
    for collection, port in (
        (STREAM_COLLECTION, NGINX_PORTS["stream"]),
        (STREAM_PRESIGNED_COLLECTION, NGINX_PORTS["stream-signed"]),
    ):
        coll, item = stream_docs(info, port, collection)
        (stac / f"{collection}.json").write_text(json.dumps(coll))
        (stac / f"{collection}.ndjson").write_text(json.dumps(item) + "\n")
        load(dsn, [stac / f"{collection}.json", stac / f"{collection}.ndjson"], progress=False, stats=False)


def stream_route_path(collection: str = STREAM_COLLECTION) -> str:
    """Our ``/stream/...`` path of the streaming item's asset, from the route's own template.

    The template may end in a ``{filename}`` (ignored by the server); it gets the name the STAC
    API's links would carry.
    """
    from tiler import stream

    href = f"http://127.0.0.1:{NGINX_PORTS['stream']}/{STREAM_FILE}"
    namer = getattr(stream, "stream_filename", None)
    filename = namer(STREAM_ITEM, STREAM_ASSET, href, "image/tiff") if namer else STREAM_FILE
    return stream.STREAM_PATH.format(
        collection_id=collection, item_id=STREAM_ITEM, asset_id=STREAM_ASSET, filename=filename
    )


# ---------------------------------------------------------------- tiles


def point_in_ring(x: float, y: float, ring: list) -> bool:
    """Ray casting."""
    inside = False
    for (x1, y1), (x2, y2) in zip(ring[:-1], ring[1:], strict=True):
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


def tiles_in(items: list[dict], z: int, min_cover: int = 1) -> list[tuple[int, int, int]]:
    """Tiles at ``z`` whose centre is inside at least ``min_cover`` item footprints."""
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    rings = [it["geometry"]["coordinates"][0] for it in items]
    minx = min(it["bbox"][0] for it in items)
    miny = min(it["bbox"][1] for it in items)
    maxx = max(it["bbox"][2] for it in items)
    maxy = max(it["bbox"][3] for it in items)
    out = []
    for t in tms.tiles(minx, miny, maxx, maxy, [z]):
        b = tms.bounds(t)
        cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
        if sum(point_in_ring(cx, cy, r) for r in rings) >= min_cover:
            out.append((t.z, t.x, t.y))
    return out


def covering_tiles(items: list[dict], count: int) -> list[tuple[int, int, int]]:
    """The tiles that hold every item in one tile, from the finest such zoom down."""
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    minx = min(it["bbox"][0] for it in items)
    miny = min(it["bbox"][1] for it in items)
    maxx = max(it["bbox"][2] for it in items)
    maxy = max(it["bbox"][3] for it in items)
    out = []
    for z in range(18, -1, -1):
        a, b = tms.tile(minx, maxy, z), tms.tile(maxx, miny, z)
        if (a.x, a.y) == (b.x, b.y):
            out.append((z, a.x, a.y))
        if len(out) == count:
            break
    return out


# ---------------------------------------------------------------- load


def fetch(port: int, path: str, timeout: float = 120) -> tuple[int, bytes, float]:
    """One GET on a fresh connection: (status, body, seconds)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    el = time.perf_counter() - t
    c.close()
    return r.status, body, el


def run_load(port: int, paths: list[str], concurrency: int) -> dict:
    """Each path once, ``concurrency`` keep-alive clients; throughput and latencies."""
    queue = deque(paths)
    lock = threading.Lock()
    res: list[tuple[float, int, int]] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if not queue:
                    break
                p = queue.popleft()
            t = time.perf_counter()
            try:
                conn.request("GET", p)
                r = conn.getresponse()
                body = r.read()
                status = r.status if body[:4] in (b"\x89PNG", b"") or r.status != 200 else -1
            except (OSError, http.client.HTTPException):
                status, body = 0, b""
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            res.append((time.perf_counter() - t, status, len(body)))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in res)
    ok = sum(r[1] == 200 for r in res)
    return {
        "n": len(res),
        "ok": ok,
        "errors": len(res) - ok,
        "statuses": sorted({r[1] for r in res}),
        "wall_s": wall,
        "rps": ok / wall if wall else 0.0,
        "p50_ms": 1000 * pct(lat, 50),
        "p95_ms": 1000 * pct(lat, 95),
        "max_ms": 1000 * lat[-1] if lat else 0.0,
    }


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


WRK_LUA = r"""
local paths = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
end
request = function()
  i = i + 1
  if i > #paths then i = 1 end
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "non2xx": %d, "sockerr": %d, "p50_us": %d, "p95_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95)))
end
"""


def run_wrk(port: int, paths_file: Path, connections: int, seconds: float) -> dict:
    """Run wrk over a fixed sequence of paths (cycled); requests/s of 2xx answers, latencies."""
    script = BENCH / "zipf.lua"
    script.write_text(WRK_LUA)
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}",
            "--",
            str(paths_file),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    data = json.loads(next(line for line in out.splitlines() if line.startswith("WRKJSON")).split(" ", 1)[1])
    ok = data["requests"] - data["non2xx"]
    wall = data["duration_us"] / 1e6
    return {
        "n": data["requests"],
        "ok": ok,
        "errors": data["non2xx"] + data["sockerr"],
        "wall_s": wall,
        "rps": ok / wall,
        "p50_ms": data["p50_us"] / 1000,
        "p95_ms": data["p95_us"] / 1000,
    }


# ---------------------------------------------------------------- raw streaming load

KIB = 1024
MIB = 1024 * KIB
#: GDAL's /vsicurl/ reads in 16 KiB-aligned chunks, merged into requests of a few hundred KiB
RANGE_ALIGN = 16 * KIB
RANGE_MIN, RANGE_MAX, RANGE_STEP = 256 * KIB, 1 * MIB, 64 * KIB
WHOLE_CHUNK = 1 * MIB


class RangeError(Exception):
    """A range answer that is not the one asked for."""


class RangeReader:
    """One keep-alive connection reading single ranges into a preallocated buffer.

    ``readinto`` lets the socket write straight into the buffer (no bytes object per answer,
    the GIL released while it waits): the client costs as little CPU as Python allows, since it
    shares the machine's cores with nginx and the server it measures.
    """

    def __init__(self, port: int, size: int, follow: bool = False):
        self.port, self.size, self.follow = port, size, follow
        self.conns: dict[int, http.client.HTTPConnection] = {}
        self.buf = memoryview(bytearray(max(RANGE_MAX, WHOLE_CHUNK)))
        #: ``follow``: the presigned target of a 307 (port, path and query, reuse until), and how
        #: many redirects were asked; GDAL does the same (one per file until the URL expires)
        self.target: tuple[int, str, float] | None = None
        self.redirects = 0

    def _conn(self, port: int) -> http.client.HTTPConnection:
        conn = self.conns.get(port)
        if conn is None:
            conn = self.conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return conn

    def get(self, path: str, start: int, end: int) -> int:
        """GET ``bytes=start-end``; the bytes received (checked: 206, Content-Range, length)."""
        want = end - start + 1
        headers = {"Range": f"bytes={start}-{end}"}
        port = self.port
        if self.follow and self.target is not None and time.time() < self.target[2]:
            port, path = self.target[0], self.target[1]
        try:
            conn = self._conn(port)
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            if r.status == 307 and self.follow:
                r.read()
                loc = urlsplit(r.getheader("Location") or "")
                if loc.hostname != "127.0.0.1" or loc.port is None:
                    raise RangeError(f"redirect off loopback: {loc.hostname}")
                expires = int(parse_qs(loc.query).get("Expires", ["0"])[0])
                self.target = (loc.port, f"{loc.path}?{loc.query}", expires - 1)
                self.redirects += 1
                conn = self._conn(loc.port)
                conn.request("GET", self.target[1], headers=headers)
                r = conn.getresponse()
            if r.status != 206 or r.getheader("Content-Range") != f"bytes {start}-{end}/{self.size}":
                r.read()
                raise RangeError(f"HTTP {r.status}, Content-Range {r.getheader('Content-Range')}")
            got = 0
            while got < want:
                n = r.readinto(self.buf[got:want])
                if not n:
                    break
                got += n
            if got != want or r.read(1):
                raise RangeError(f"{got} bytes for a {want}-byte range")
            return got
        except (OSError, http.client.HTTPException, RangeError):
            self.close()
            raise

    def close(self) -> None:
        """Drop the connections."""
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


def random_range(rng: random.Random, size: int) -> tuple[int, int]:
    """An aligned range of 256 KiB to 1 MiB (64 KiB steps), cut at the end of the file."""
    start = rng.randrange(0, size // RANGE_ALIGN) * RANGE_ALIGN
    length = rng.randrange(RANGE_MIN, RANGE_MAX + 1, RANGE_STEP)
    return start, min(start + length, size) - 1


def run_ranges(
    port: int,
    path: str,
    size: int,
    readers: int,
    *,
    whole: bool = False,
    seconds: float = 0,
    seed: int = 0,
    follow: bool = False,
) -> dict:
    """``readers`` keep-alive clients reading ranges of one file for ``seconds``; MB/s and latencies.

    Random ranges (`random_range`, each reader its own seeded sequence, so every server is
    asked the same ranges in the same order) until the time is up; or, ``whole``, the whole
    file in 1 MiB ranges taken in order from a shared queue, pass after pass until the time
    is up (at least one pass; the pass under way is finished). ``follow``: each reader follows
    a 307 and reads from its target until the target's ``Expires``, as GDAL does.
    """
    one_pass = [(a, min(a + WHOLE_CHUNK, size) - 1) for a in range(0, size, WHOLE_CHUNK)]
    queue: deque | None = deque(one_pass) if whole else None
    passes = [1]
    lock = threading.Lock()
    barrier = threading.Barrier(readers + 1)
    out: list[tuple[float, int]] = []  # (seconds, bytes) of every answer
    errors: list[str] = []
    deadline = [0.0]
    redirects = [0]

    def reader(k: int) -> None:
        rd = RangeReader(port, size, follow=follow)
        rng = random.Random(seed * 1000 + k)
        mine: list[tuple[float, int]] = []
        barrier.wait()
        while True:
            if queue is None:
                if time.perf_counter() >= deadline[0]:
                    break
                a, b = random_range(rng, size)
            else:
                with lock:
                    if not queue:
                        if time.perf_counter() >= deadline[0]:
                            break
                        queue.extend(one_pass)
                        passes[0] += 1
                    a, b = queue.popleft()
            t = time.perf_counter()
            try:
                n = rd.get(path, a, b)
            except (OSError, http.client.HTTPException, RangeError) as e:
                errors.append(f"bytes={a}-{b}: {type(e).__name__}: {e}")
                continue
            mine.append((time.perf_counter() - t, n))
        rd.close()
        with lock:
            out.extend(mine)
            redirects[0] += rd.redirects

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(readers)]
    for th in threads:
        th.start()
    cpu0 = os.times()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    barrier.wait()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    total = sum(n for _, n in out)
    lat = sorted(s for s, _ in out)
    return {
        "requests": len(out),
        "bytes": total,
        "passes": passes[0] if whole else None,
        "errors": len(errors),
        "first_errors": errors[:5],
        "wall_s": wall,
        "MBps": total / wall / 1e6 if wall else 0.0,
        "p50_ms": 1000 * pct(lat, 50),
        "p95_ms": 1000 * pct(lat, 95),
        "client_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "redirects": redirects[0],
    }


def check_ranges(port: int, path: str, local: Path, follow: bool = False) -> list[dict]:
    """A sample of ranges (and the whole file once) through ``port``, compared with the file on disk.

    ``follow``: a 307 is followed (to loopback only), as GDAL would.
    """
    import hashlib

    data = local.read_bytes()
    size = len(data)
    rng = random.Random(4242)
    asks: list[str | None] = ["bytes=0-16383", f"bytes={size - 300_000}-{size - 1}", f"bytes={size - 5000}-"]
    asks += ["bytes=-4096"]
    for _ in range(12):
        a, b = random_range(rng, size)
        asks.append(f"bytes={a}-{b}")
    asks.append(None)  # no Range: 200, the whole file
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for ask in asks:
        conn.request("GET", path, headers={"Range": ask} if ask else {})
        r = conn.getresponse()
        body = r.read()
        if follow and r.status == 307:
            loc = urlsplit(r.getheader("Location") or "")
            if loc.hostname != "127.0.0.1" or loc.port is None:
                raise RuntimeError(f"stream: redirect off loopback ({loc.hostname})")
            target = http.client.HTTPConnection("127.0.0.1", loc.port, timeout=60)
            target.request("GET", f"{loc.path}?{loc.query}", headers={"Range": ask} if ask else {})
            r = target.getresponse()
            body = r.read()
            target.close()
        if ask is None:
            want, expect_status = data, 200
        else:
            a, _, b = ask.removeprefix("bytes=").partition("-")
            if not a:
                start, end = size - int(b), size - 1
            else:
                start, end = int(a), int(b) if b else size - 1
            want, expect_status = data[start : end + 1], 206
        ok = r.status == expect_status and body == want
        if ask is not None:
            ok = ok and r.getheader("Content-Range") == f"bytes {start}-{end}/{size}"
        out.append(
            {
                "range": ask or "(none)",
                "status": r.status,
                "bytes": len(body),
                "equal": body == want,
                "ok": ok,
                "sha256": hashlib.sha256(body).hexdigest()[:16] if ask is None else None,
                "body": None if r.status == expect_status else body[:300].decode(errors="replace"),
            }
        )
    conn.close()
    return out


class RssSampler:
    """VmRSS of some processes every ``every`` seconds, in a thread: peaks between marks."""

    def __init__(self, pids: list[int], every: float = 0.05):
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            snap = {}
            for pid in self.pids:
                try:
                    snap[pid] = memory(pid)["VmRSS"]
                except (OSError, KeyError):
                    continue
            self.samples.append((time.monotonic(), snap))
            self._stop.wait(self.every)

    def start(self) -> RssSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[int, float]:
        """Highest VmRSS of each process between two ``time.monotonic()`` instants."""
        out: dict[int, float] = {}
        for t, snap in self.samples:
            if since <= t <= until:
                for pid, v in snap.items():
                    out[pid] = max(out.get(pid, 0.0), v)
        return out


# ---------------------------------------------------------------- servers


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its children so far."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(d.name) == pid or int(f[1]) == pid:
            total += (int(f[11]) + int(f[12])) / tick
    return total


def start_redis() -> Proc | None:
    """A private redis-server on 127.0.0.1 (no persistence) for our shared tile cache, if installed."""
    if shutil.which("redis-server") is None:
        log("redis-server not installed: our tile cache runs without its shared tier")
        return None
    ensure_free(REDIS_PORT)
    data = BENCH / "redis"
    data.mkdir(exist_ok=True)
    proc = Proc(
        "redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(REDIS_PORT),
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "256mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError("redis-server did not start")


REDIS_URL: str | None = None  # set by main() when a redis-server runs for the bench


#: variables for our server in every case (``--ours-env``)
OURS_ENV: dict[str, str] = {}
#: variables for stock titiler-pgstac in every case (``--stock-env``)
STOCK_ENV: dict[str, str] = {}


def start_servers(
    workers: int, py: str, only: str | None = None, extra_env: dict[str, str] | None = None
) -> dict[str, Proc]:
    """dinamis-tiler and stock titiler-pgstac on loopback, ``workers`` each; waits until both answer.

    ``extra_env``: more variables for ours (``TILER_STREAM_CHUNK_KB=256``, ...).
    """
    from tiler.embedded import LocalCluster

    dsn = LocalCluster(BENCH / "postgres", PG_PORT).dsn
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TILER_", "GDAL_", "VSI_", "CPL_"))}
    base_env["DATABASE_URL"] = dsn
    ours_env = dict(base_env, TILER_AUTH_ENABLED="false", PYTHONPATH=str(ROOT))
    if REDIS_URL:
        ours_env["TILER_CACHE_REDIS_URL"] = REDIS_URL
    ours_env.update(OURS_ENV)
    ours_env.update(extra_env or {})
    stock_env = dict(base_env, **STOCK_GDAL)
    stock_env.pop("PYTHONPATH", None)
    stock_env.update(STOCK_ENV)
    specs = {
        "ours": (
            "ours",
            [  # through `tiler exec`, as the Docker image starts it: the malloc of TILER_READER_ALLOCATOR
                py,
                "-m",
                "tiler.cli",
                "exec",
                py,
                "-m",
                "uvicorn",
                "tiler.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(SERVER_PORTS["ours"]),
                "--workers",
                str(workers),
                "--no-access-log",
            ],
            ours_env,
            ROOT,
        ),
        "stock": (
            "stock",
            [
                str(STOCK_VENV / "bin" / "python"),
                "-m",
                "uvicorn",
                "titiler.pgstac.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(SERVER_PORTS["stock"]),
                "--workers",
                str(workers),
                "--no-access-log",
            ],
            stock_env,
            BENCH,
        ),
    }
    for n in specs:
        if only in (None, n):
            ensure_free(SERVER_PORTS[n])
    procs: dict[str, Proc] = {}
    try:
        for n, spec in specs.items():
            if only in (None, n):
                procs[n] = Proc(*spec)
    except BaseException:
        stop_servers(procs)  # one could not start: leave nothing behind
        raise
    for name in procs:
        try:
            wait_http(SERVER_PORTS[name], "/healthz", 90)
        except RuntimeError:
            for q in procs.values():
                q.stop()
            tail = (BENCH / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} did not start:\n" + "\n".join(tail)) from None
    return procs


def stop_servers(procs: dict[str, Proc]) -> None:
    """Stop what `start_servers` started."""
    for p in procs.values():
        p.stop()


# ---------------------------------------------------------------- cases


class Bench:
    """Runs the cases and keeps the results."""

    def __init__(self, args: argparse.Namespace, items: list[dict]):
        self.args = args
        self.items = items
        self.results: dict[str, dict] = {}
        self.procs: dict[str, Proc] | None = None
        self.profiles: list[tuple[str, Path]] = []

    # URL builders: the same query for both servers, only the collection id differs
    @staticmethod
    def item_tile(srv: str, item: str, t: tuple, q: str) -> str:
        """Item tile path."""
        z, x, y = t
        return f"/collections/{COLLECTIONS[srv]}/items/{item}/tiles/WebMercatorQuad/{z}/{x}/{y}.png?{q}"

    @staticmethod
    def mosaic_tile(coll: str, t: tuple, q: str = MS_RGB) -> str:
        """Mosaic (collection) tile path."""
        z, x, y = t
        return f"/collections/{coll}/tiles/WebMercatorQuad/{z}/{x}/{y}.png?{q}"

    def order(self, r: int) -> tuple[str, str]:
        """Who goes first in round ``r``."""
        return ("ours", "stock") if r % 2 == 0 else ("stock", "ours")

    def record(self, name: str, runs: dict[str, list[dict]], **extra) -> None:
        """Keep a case's per-round results."""
        self.results[name] = {"rounds": runs, **extra}

    def distinct(self, name: str, tiles_by_server, concurrency: int, per_round: int) -> None:
        """Throughput and latency over tiles never requested before, alternated rounds."""
        rounds = self.args.rounds
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        for r in range(rounds):
            for srv in self.order(r):
                paths = tiles_by_server(srv)[r * per_round : (r + 1) * per_round]
                spies = self.spy_start(name) if srv == "ours" else []
                runs[srv].append(run_load(SERVER_PORTS[srv], paths, concurrency))
                self.spy_stop(spies)
        self.record(name, runs, tiles_per_round=per_round, concurrency=concurrency)
        o, s = runs["ours"], runs["stock"]
        log(
            f"{name}: ours {med(o, 'rps'):.1f}/s p50 {med(o, 'p50_ms'):.0f} ms | stock {med(s, 'rps'):.1f}/s "
            f"p50 {med(s, 'p50_ms'):.0f} ms | errors {sum(x['errors'] for x in o)}/{sum(x['errors'] for x in s)}"
        )

    def spy_start(self, case: str, master: int | None = None, workers: int | None = None) -> list:
        """py-spy on each of our workers (``--profile``), raw collapsed stacks.

        The workers of ``master`` (``workers`` of them), else of the shared server of ours.
        """
        if not self.args.profile or (master is None and self.procs is None):
            return []
        if master is None:
            master, workers = self.procs["ours"].pid, self.args.workers
        exe = shutil.which("py-spy") or str(STOCK_VENV / "bin" / "py-spy")
        spies = []
        for pid in worker_pids(master, workers):
            out = BENCH / "profile" / f"{len(self.profiles):03d}-{pid}.txt"
            out.parent.mkdir(exist_ok=True)
            spies.append(
                (
                    case,
                    out,
                    subprocess.Popen(
                        [
                            exe,
                            "record",
                            "--pid",
                            str(pid),
                            "--rate",
                            "100",
                            "--nonblocking",
                            "--format",
                            "raw",
                            "--output",
                            str(out),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
            self.profiles.append((case, out))
        time.sleep(0.5)
        return spies

    def spy_stop(self, spies: list) -> None:
        """Stop the profilers (they write their file on SIGINT)."""
        for _, _, sp in spies:
            sp.send_signal(signal.SIGINT)
        for _, _, sp in spies:
            try:
                sp.wait(20)
            except subprocess.TimeoutExpired:
                sp.kill()

    def item_cases(self) -> None:
        """Distinct item tiles at mid and max zoom, MS and pan."""
        a = self.args
        conc = a.concurrency
        specs = [
            ("item MS z14 (mid zoom)", 14, MS_RGB, "ms"),
            ("item MS z15 (max zoom)", 15, MS_RGB, "ms"),
            ("item pan z15 (mid zoom)", 15, PAN, "pan"),
            ("item pan z17 (max zoom)", 17, PAN, "pan"),
        ]
        for name, z, q, _ in specs:
            pairs = [(it["id"], t) for it in self.items for t in tiles_in([it], z)]
            random.Random(z).shuffle(pairs)
            per_round = min(a.tiles, len(pairs) // a.rounds)
            self.distinct(
                name,
                lambda srv, pairs=pairs, q=q: [self.item_tile(srv, i, t, q) for i, t in pairs],
                conc,
                per_round,
            )

    def mosaic_case(self) -> None:
        """Distinct mosaic tiles where 2-3 scenes overlap."""
        a = self.args
        tiles = tiles_in(self.items, 15, min_cover=2) + tiles_in(self.items, 16, min_cover=2)
        random.Random(15).shuffle(tiles)
        per_round = min(a.tiles, len(tiles) // a.rounds)
        self.distinct(
            "mosaic z15-16 over the overlap",
            lambda srv: [self.mosaic_tile(COLLECTIONS[srv], t) for t in tiles],
            a.concurrency,
            per_round,
        )

    def low_zoom_case(self, py: str) -> None:
        """The finest tile that holds the whole collection, cold, each server alone and fresh.

        Each server is started alone (1 worker), asked once with a client timeout, then
        stopped: a tile that is still rendering after its client has gone cannot slow the
        other server or the next case. Files opened are counted from the nginx log.
        """
        tile = covering_tiles(self.items, 1)[0]
        timeout = self.args.lowzoom_timeout
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        for srv in ("ours", "stock"):
            procs = start_servers(1, py, only=srv)
            try:
                olog = OriginLog(srv)
                olog.mark()
                try:
                    st, _, el = fetch(SERVER_PORTS[srv], self.mosaic_tile(COLLECTIONS[srv], tile), timeout)
                except TimeoutError:
                    st, el = 0, float("inf")
                origin = olog.since()
                cpu = cpu_seconds(procs[srv].pid)
                # the client has closed its connection: does the server keep rendering?
                time.sleep(3)
                after = cpu_seconds(procs[srv].pid) - cpu
            finally:
                stop_servers(procs)
            runs[srv].append(
                {
                    "tile": tile,
                    "ms": 1000 * el,
                    "status": st,
                    "files": origin["files"],
                    "origin_requests": origin["requests"],
                    "cpu_s_at_answer_or_timeout": cpu,
                    "cpu_s_in_3s_after": after,
                    "errors": int(st != 200),
                }
            )
        self.record("low zoom, whole collection", runs, timeout_s=timeout)
        log(
            f"low zoom z{tile[0]}: ours {runs['ours'][0]['ms']:.0f} ms, stock {runs['stock'][0]['ms']:.0f} ms "
            f"(timeout {timeout:.0f} s)"
        )

    def workers_case(self, py: str) -> None:
        """Scale-out on one node: distinct z16 MS item tiles with 1 and with 2 workers, fresh servers.

        Each (server, workers) pair gets a fresh process group and its own tiles (none
        requested before in that process), 4 clients, so caches cannot help.
        """
        tiles = []
        for it in self.items:
            tiles += [(it["id"], t) for t in tiles_in([it], 16)]
        random.Random(16).shuffle(tiles)
        n = min(self.args.tiles * 2, len(tiles) // 4)
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        k = 0
        for workers in (1, 2):
            for srv in ("ours", "stock"):
                procs = start_servers(workers, py, only=srv)
                try:
                    # imports and route tables on every worker, outside the measured tiles
                    for _ in range(2 * workers):
                        fetch(
                            SERVER_PORTS[srv],
                            f"/collections/{COLLECTIONS[srv]}/tiles/WebMercatorQuad/tilejson.json",
                        )
                    chunk = tiles[k * n : (k + 1) * n]
                    paths = [self.item_tile(srv, item, t, MS_RGB) for item, t in chunk]
                    res = run_load(SERVER_PORTS[srv], paths, self.args.concurrency)
                finally:
                    stop_servers(procs)
                runs[srv].append(dict(res, workers=workers))
                k += 1
        self.record("workers", runs)
        o, st = runs["ours"], runs["stock"]
        log(
            f"workers: ours {o[0]['rps']:.1f}/s (1) {o[1]['rps']:.1f}/s (2), "
            f"stock {st[0]['rps']:.1f}/s (1) {st[1]['rps']:.1f}/s (2)"
        )

    def preview_case(self) -> None:
        """512 px MS preview of each item, sequential; each round a slightly different size."""
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        thumbs = []
        for r in range(self.args.rounds):
            size = 512 - 2 * r
            for srv in self.order(r):
                paths = [
                    f"/collections/{COLLECTIONS[srv]}/items/{it['id']}/preview.png?{MS_RGB}&max_size={size}"
                    for it in self.items
                ]
                runs[srv].append(run_load(SERVER_PORTS[srv], paths, 1))
            t = [
                f"/collections/{COLLECTIONS['ours']}/items/{it['id']}/thumbnail.png?{MS_RGB}&size={256 - r}"
                for it in self.items
            ]
            thumbs.append(run_load(SERVER_PORTS["ours"], t, 1))
        self.record("preview 512 px", runs)
        self.results["thumbnail 256 px (ours only)"] = {"rounds": {"ours": thumbs}}
        log(
            f"preview: ours p50 {med(runs['ours'], 'p50_ms'):.0f} ms, stock {med(runs['stock'], 'p50_ms'):.0f} ms, "
            f"ours thumbnail {med(thumbs, 'p50_ms'):.0f} ms"
        )

    def zipf_case(self) -> None:
        """Many clients panning the same places: Zipf(1.1) over ~300 mosaic tiles, wrk."""
        import numpy as np

        pool = []
        for z in (13, 14, 15, 16):
            pool += tiles_in(self.items, z)
        random.Random(300).shuffle(pool)
        pool = pool[:300]
        rng = np.random.default_rng(7)
        ranks = np.arange(1, len(pool) + 1)
        prob = ranks**-1.1
        seq = rng.choice(len(pool), size=50_000, p=prob / prob.sum())
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        use_wrk = shutil.which("wrk") is not None
        # round -1: one unmeasured round per server (the steady state is what users see; a
        # server without a cache gains nothing from it)
        for r in range(-1, self.args.rounds):
            for srv in self.order(max(r, 0)):
                paths = [self.mosaic_tile(COLLECTIONS[srv], pool[i]) for i in seq]
                if r < 0:
                    f = BENCH / f"zipf-{srv}.txt"
                    f.write_text("\n".join(paths[-5000:]) + "\n")
                    if use_wrk:
                        run_wrk(SERVER_PORTS[srv], f, self.args.clients, self.args.zipf_seconds)
                    else:
                        run_load(
                            SERVER_PORTS[srv], paths[-40 * int(self.args.zipf_seconds) :], self.args.clients
                        )
                    continue
                if use_wrk:
                    f = BENCH / f"zipf-{srv}.txt"
                    # each round starts further along the sequence
                    k = r * 2000
                    f.write_text("\n".join(paths[k:] + paths[:k]) + "\n")
                    runs[srv].append(run_wrk(SERVER_PORTS[srv], f, self.args.clients, self.args.zipf_seconds))
                else:
                    runs[srv].append(
                        run_load(
                            SERVER_PORTS[srv], paths[: 40 * int(self.args.zipf_seconds)], self.args.clients
                        )
                    )
        self.record(
            "repeated views (Zipf, 300 tiles)",
            runs,
            clients=self.args.clients,
            tool="wrk" if use_wrk else "python",
        )
        log(f"zipf: ours {med(runs['ours'], 'rps'):.1f}/s, stock {med(runs['stock'], 'rps'):.1f}/s")

    def scale_case(self) -> None:
        """Same mosaic tiles, 10 items vs --scale-items items in the collection, each server."""
        tiles = tiles_in(self.items, 16, min_cover=2)
        random.Random(16).shuffle(tiles)
        n = min(self.args.scale_tiles, len(tiles) // self.args.rounds)
        runs: dict[str, list[dict]] = {"ours": [], "stock": []}
        for r in range(self.args.rounds):
            for srv in self.order(r):
                res = {}
                ids = scale_ids(self.args.scale_items)
                colls = ids if r % 2 == 0 else ids[::-1]
                for coll in colls:
                    paths = [self.mosaic_tile(coll, t) for t in tiles[r * n : (r + 1) * n]]
                    res[coll] = run_load(SERVER_PORTS[srv], paths, 1)
                small, big = res[ids[0]], res[ids[1]]
                runs[srv].append(
                    {
                        "small_p50_ms": small["p50_ms"],
                        "big_p50_ms": big["p50_ms"],
                        "ratio": big["p50_ms"] / small["p50_ms"],
                        "errors": small["errors"] + big["errors"],
                    }
                )
        self.record(f"catalogue scale ({self.args.scale_items} vs 10 items)", runs, tiles_per_round=n)
        log(
            f"scale: ours big/small {med(runs['ours'], 'ratio'):.2f}, stock {med(runs['stock'], 'ratio'):.2f}"
        )

    def stream_case(self, py: str, info: dict, nginx: Proc) -> None:
        """Raw COG streaming: ``/stream/...`` of ours against nginx read directly, same ranges.

        A fresh server of ours only (``--stream-workers``, ``--stream-env``): stock titiler-pgstac
        has no streaming route, so the reference is the origin itself, the same nginx serving
        the same file on its own port (the bytes then take the path client -> nginx instead of
        client -> ours -> nginx). Before measuring, a sample of ranges and the whole file are
        compared with the file on disk, through both. Then, alternated over ``--rounds``
        (ours, direct, then direct, ours): ``--stream-readers`` keep-alive readers asking random
        aligned 256 KiB-1 MiB ranges for ``--stream-seconds`` (each round its own seeded
        sequences, the same for both), then the whole file once in 1 MiB ranges. Our workers'
        VmRSS is sampled every 50 ms from after the warm-up to the end; origin requests of ours
        are counted from nginx's log (one per client request, the same bytes).
        """
        a = self.args
        readers, seconds = a.stream_readers, a.stream_seconds
        size, local = info["size"], info["path"]
        paths = {
            "ours": stream_route_path(),
            "ours-redirect": stream_route_path(STREAM_PRESIGNED_COLLECTION),
            "direct": f"/{STREAM_FILE}",
            "nginx-proxy": f"/{STREAM_FILE}",
        }
        ports = {
            "ours": SERVER_PORTS["ours"],
            "ours-redirect": SERVER_PORTS["ours"],
            "direct": NGINX_PORTS["stream-direct"],
            "nginx-proxy": NGINX_PROXY_PORT,
        }
        follow = {"ours-redirect": True}
        sides: tuple[str, ...] = ("ours", "ours-redirect", "direct")
        if a.stream_nginx_proxy:
            sides += ("nginx-proxy",)
        # the presigning storage's prefix: /stream answers 307 to a secure_link URL there
        creds = BENCH / "stream-credentials.yaml"
        creds.write_text(
            f"- prefix: http://127.0.0.1:{NGINX_PORTS['stream-signed']}/\n"
            "  signer: tiler.signers:secure_link\n  stream: redirect\n"
        )
        extra = {"TILER_UPSTREAM_CREDENTIALS_FILE": str(creds), "TILER_SECURE_LINK_SECRET": STREAM_SECRET}
        extra.update(dict(kv.split("=", 1) for kv in a.stream_env))
        procs = start_servers(a.stream_workers, py, only="ours", extra_env=extra)
        master = procs["ours"].pid
        try:
            pids = worker_pids(master, a.stream_workers)
            checks = {
                who: check_ranges(ports[who], paths[who], local, follow=follow.get(who, False))
                for who in sides
            }
            bad = [
                f"{who} {c['range']}: HTTP {c['status']}, {c['bytes']} bytes, equal {c['equal']}"
                + (f" ({c['body']})" if c["body"] else "")
                for who, cs in checks.items()
                for c in cs
                if not c["ok"]
            ]
            if bad:
                raise RuntimeError("stream: answers differ from the file on disk:\n  " + "\n  ".join(bad[:6]))
            log(f"stream: {sum(len(c) for c in checks.values())} ranges checked against the file, all equal")
            # warm-up, not measured: the file in the page cache, then the route on the workers
            # (imports, the asset href cache, the storage client's connections)
            run_ranges(ports["direct"], paths["direct"], size, readers, whole=True)
            run_ranges(ports["ours"], paths["ours"], size, readers, seconds=1.0, seed=999)
            run_ranges(
                ports["ours"], paths["ours-redirect"], size, readers, seconds=1.0, seed=999, follow=True
            )
            time.sleep(0.5)
            rss_start = {pid: memory(pid) for pid in pids}
            sampler = RssSampler(pids).start()
            olog = OriginLog("stream")
            slog = OriginLog("stream-signed")
            runs: dict[str, list[dict]] = {who: [] for who in sides}
            rounds_rss = []
            try:
                for r in range(a.rounds):
                    t_round = time.monotonic()
                    for who in sides if r % 2 == 0 else sides[::-1]:
                        olog.mark()
                        slog.mark()
                        cpu_w0 = {pid: cpu_seconds(pid) for pid in pids}
                        cpu_n0 = cpu_seconds(nginx.pid)
                        spies = (
                            self.spy_start("raw stream", master, a.stream_workers) if who == "ours" else []
                        )
                        fw = follow.get(who, False)
                        rnd = run_ranges(
                            ports[who], paths[who], size, readers, seconds=seconds, seed=r, follow=fw
                        )
                        whole = run_ranges(
                            ports[who], paths[who], size, readers, whole=True, seconds=seconds / 2, follow=fw
                        )
                        self.spy_stop(spies)
                        entry = {
                            "random": rnd,
                            "whole": whole,
                            "worker_cpu_s": {pid: cpu_seconds(pid) - cpu_w0[pid] for pid in pids},
                            "nginx_cpu_s": cpu_seconds(nginx.pid) - cpu_n0,
                            "errors": rnd["errors"] + whole["errors"],
                        }
                        origin_log = {"ours": olog, "ours-redirect": slog}.get(who)
                        if origin_log is not None:
                            o = origin_log.since()
                            entry["origin"] = {
                                "requests": o["requests"],
                                "head": o["head"],
                                "bytes": o["bytes"],
                                "client_requests": rnd["requests"] + whole["requests"] + entry["errors"],
                                "client_bytes": rnd["bytes"] + whole["bytes"],
                                "redirects": rnd["redirects"] + whole["redirects"],
                            }
                        runs[who].append(entry)
                    end = {pid: memory(pid)["VmRSS"] for pid in pids}
                    peak = sampler.peak(t_round)
                    rounds_rss.append({"end": end, "peak": peak})
                    o, d, v = runs["ours"][-1], runs["direct"][-1], runs["ours-redirect"][-1]
                    log(
                        f"stream round {r + 1}: presigned redirect random {v['random']['MBps']:.0f} MB/s "
                        f"({v['random']['MBps'] / d['random']['MBps']:.2f}), whole file {v['whole']['MBps']:.0f} "
                        f"({v['whole']['MBps'] / d['whole']['MBps']:.2f}), "
                        f"{v['origin']['redirects']} redirects for {v['origin']['client_requests']} ranges"
                    )
                    if "nginx-proxy" in runs:
                        x = runs["nginx-proxy"][-1]
                        log(
                            f"stream round {r + 1}: nginx proxy random {x['random']['MBps']:.0f} MB/s, "
                            f"whole file {x['whole']['MBps']:.0f} MB/s"
                        )
                    log(
                        f"stream round {r + 1}: random ours {o['random']['MBps']:.0f} MB/s, direct "
                        f"{d['random']['MBps']:.0f} MB/s ({o['random']['MBps'] / d['random']['MBps']:.2f}); "
                        f"whole file ours {o['whole']['MBps']:.0f}, direct {d['whole']['MBps']:.0f} "
                        f"({o['whole']['MBps'] / d['whole']['MBps']:.2f}); RSS MiB "
                        + ", ".join(f"{end[p]:.0f} (peak {peak.get(p, 0):.0f})" for p in pids)
                    )
            finally:
                sampler.stop()
            time.sleep(1.0)
            rss_end = {pid: memory(pid) for pid in pids}
        finally:
            stop_servers(procs)
        rss = {
            str(pid): {
                "start": rss_start[pid]["VmRSS"],
                "peak": max((x["peak"].get(pid, 0.0) for x in rounds_rss), default=0.0),
                "end": rss_end[pid]["VmRSS"],
                "round_ends": [x["end"][pid] for x in rounds_rss],
                "round_peaks": [x["peak"].get(pid, 0.0) for x in rounds_rss],
                "VmHWM_end": rss_end[pid]["VmHWM"],
            }
            for pid in pids
        }
        ratios = {
            kind: [
                o[kind]["MBps"] / d[kind]["MBps"] for o, d in zip(runs["ours"], runs["direct"], strict=True)
            ]
            for kind in ("random", "whole")
        }
        for kind in ("random", "whole"):
            ratios[f"redirect {kind}"] = [
                x[kind]["MBps"] / d[kind]["MBps"]
                for x, d in zip(runs["ours-redirect"], runs["direct"], strict=True)
            ]
        if "nginx-proxy" in runs:
            for kind in ("random", "whole"):
                ratios[f"nginx-proxy {kind}"] = [
                    x[kind]["MBps"] / d[kind]["MBps"]
                    for x, d in zip(runs["nginx-proxy"], runs["direct"], strict=True)
                ]
        self.record(
            "raw stream",
            runs,
            readers=readers,
            seconds=seconds,
            workers=a.stream_workers,
            env=extra,
            file={k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()},
            checks=checks,
            ratios=ratios,
            rss=rss,
        )
        log(
            f"stream: median ours/direct random {statistics.median(ratios['random']):.2f}, "
            f"whole file {statistics.median(ratios['whole']):.2f}; presigned redirect random "
            f"{statistics.median(ratios['redirect random']):.2f}, whole file "
            f"{statistics.median(ratios['redirect whole']):.2f}"
        )

    def memory_snapshot(self, procs: dict[str, Proc], label: str) -> dict:
        """Peak and current RSS of every worker."""
        snap = {}
        for srv, p in procs.items():
            snap[srv] = [memory(pid) for pid in worker_pids(p.pid, self.args.workers)]
        self.results.setdefault("memory", {})[label] = snap
        return snap

    def equivalence(self) -> None:
        """Same pixels from both servers for a sample of the requests measured."""
        import io

        import numpy as np
        from PIL import Image

        checks = []
        it = self.items[0]
        samples = [
            (
                self.item_tile("ours", it["id"], tiles_in([it], 15)[3], MS_RGB),
                self.item_tile("stock", it["id"], tiles_in([it], 15)[3], MS_RGB),
            ),
            (
                self.item_tile("ours", it["id"], tiles_in([it], 17)[5], PAN),
                self.item_tile("stock", it["id"], tiles_in([it], 17)[5], PAN),
            ),
            # mid zoom: read from an overview (or the full resolution downsampled)
            (
                self.item_tile("ours", it["id"], tiles_in([it], 14)[3], MS_RGB),
                self.item_tile("stock", it["id"], tiles_in([it], 14)[3], MS_RGB),
            ),
            (
                self.item_tile("ours", it["id"], tiles_in([it], 15)[7], PAN),
                self.item_tile("stock", it["id"], tiles_in([it], 15)[7], PAN),
            ),
            (
                self.item_tile("ours", it["id"], tiles_in([it], 13)[2], PAN),
                self.item_tile("stock", it["id"], tiles_in([it], 13)[2], PAN),
            ),
            (
                self.mosaic_tile(COLLECTIONS["ours"], tiles_in(self.items, 15, 2)[0]),
                self.mosaic_tile(COLLECTIONS["stock"], tiles_in(self.items, 15, 2)[0]),
            ),
            (
                f"/collections/{COLLECTIONS['ours']}/items/{it['id']}/preview.png?{MS_RGB}&max_size=256",
                f"/collections/{COLLECTIONS['stock']}/items/{it['id']}/preview.png?{MS_RGB}&max_size=256",
            ),
        ]
        for po, ps in samples:
            so, bo, _ = fetch(SERVER_PORTS["ours"], po)
            ss, bs, _ = fetch(SERVER_PORTS["stock"], ps)
            entry = {"ours": po, "stock": ps, "status": [so, ss]}
            if so == ss == 200:
                a = np.asarray(Image.open(io.BytesIO(bo)))
                b = np.asarray(Image.open(io.BytesIO(bs)))
                entry["shape"] = [list(a.shape), list(b.shape)]
                if a.shape == b.shape:
                    d = np.abs(a.astype(int) - b.astype(int))
                    entry["max_abs_diff"] = int(d.max())
                    entry["identical"] = bool((d == 0).all())
                    entry["mean_abs_diff"] = float(d.mean())
            checks.append(entry)
        self.results["equivalence"] = checks
        log(
            "equivalence: "
            + "; ".join(
                f"{c['ours'].split('?')[0]}: status {c['status']} identical={c.get('identical')} "
                f"max diff={c.get('max_abs_diff')}"
                for c in checks
            )
        )

    def origin_case(self, py: str) -> None:
        """Origin requests per tile: cold, warm-same and warm-neighbour, fresh servers (1 worker).

        One process per server for the three kinds, each kind on files no earlier kind opened:
        item MS tiles on scene 0, item pan tiles on scene 1, mosaic tiles where scenes 1 and 2
        overlap outside scene 0 (their MS files). "Cold" is the first tile of a file.
        """
        it0, it1 = self.items[0], self.items[1]
        ring0 = it0["geometry"]["coordinates"][0]
        ms = tiles_in([it0], 15)
        pan = tiles_in([it1], 17)
        mos = [t for t in tiles_in(self.items[1:3], 15, 2) if not point_in_ring(*tile_centre(t), ring0)]

        def neighbour(t, pool):
            z, x, y = t
            return next(((z, x + dx, y) for dx in (1, -1) if (z, x + dx, y) in pool), pool[1])

        kinds = [
            ("item MS z15", lambda srv, t: self.item_tile(srv, it0["id"], t, MS_RGB), ms[len(ms) // 2], ms),
            ("item pan z17", lambda srv, t: self.item_tile(srv, it1["id"], t, PAN), pan[len(pan) // 2], pan),
            (
                "mosaic z15 (2 scenes)",
                lambda srv, t: self.mosaic_tile(COLLECTIONS[srv], t),
                mos[len(mos) // 2],
                mos,
            ),
        ]
        out: dict[str, dict] = {}
        procs = start_servers(1, py)
        try:
            for kind, url, tile, pool in kinds:
                out[kind] = {}
                for srv in ("ours", "stock"):
                    olog = OriginLog(srv)
                    res = {}
                    for step, t in (
                        ("cold", tile),
                        ("warm-same", tile),
                        ("warm-neighbour", neighbour(tile, pool)),
                    ):
                        olog.mark()
                        st, _, el = fetch(SERVER_PORTS[srv], url(srv, t))
                        res[step] = dict(olog.since(), status=st, ms=1000 * el, tile=t)
                    out[kind][srv] = res
                o, s = out[kind]["ours"], out[kind]["stock"]
                log(
                    f"origin {kind}: ours {o['cold']['requests']}/{o['warm-same']['requests']}/"
                    f"{o['warm-neighbour']['requests']} req, stock {s['cold']['requests']}/"
                    f"{s['warm-same']['requests']}/{s['warm-neighbour']['requests']} req (cold/same/neighbour)"
                )
        finally:
            stop_servers(procs)
        self.results["origin"] = out


def tile_centre(t: tuple[int, int, int]) -> tuple[float, float]:
    """Longitude, latitude of a WebMercatorQuad tile's centre."""
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    bb = tms.bounds(morecantile.Tile(t[1], t[2], t[0]))
    return (bb.left + bb.right) / 2, (bb.bottom + bb.top) / 2


#: Where a sample's stack says the time goes (first match wins, checked from the leaf up).
PROFILE_BUCKETS = [
    ("PNG encode (rio_tiler render)", ("render (rio_tiler/models.py", "render (rio_tiler/utils.py")),
    ("waiting for / talking to pgstac (psycopg)", ("psycopg",)),
    ("mosaic orchestration", ("rio_tiler/mosaic",)),
    ("GDAL read, decode, warp", ("read (rio_tiler/reader.py", "part (rio_tiler/reader.py")),
    ("rescale/post-process (numpy)", ("rescale", "post_process", "apply_expression")),
    ("dataset open / metadata", ("__attrs_post_init__", "open (rasterio", "_get_reader", "Reader.__init__")),
    ("storage client (stream): httpx/httpcore", ("httpcore/", "httpx/")),
    ("HTTP server protocol (stream): uvicorn", ("uvicorn/protocols",)),
    ("FastAPI/starlette/uvicorn", ("starlette", "fastapi", "uvicorn")),
]


#: Leaf frames of threads that wait rather than work.
IDLE_LEAVES = (
    "select (selectors.py",
    "Condition.wait",
    "Event.wait",
    "Queue.get",
    "_recv (multiprocessing",
    "_recv_bytes (multiprocessing",
    "sleep",
    "_worker (concurrent/futures/thread.py",
)


def profile_summary(profiles: list[tuple[str, Path]]) -> dict:
    """Share of samples per bucket and the top leaf frames, per case (py-spy raw output)."""
    out: dict[str, dict] = {}
    for case, path in profiles:
        if not path.exists():
            continue
        agg = out.setdefault(case, {"samples": 0, "buckets": {}, "leaf": {}})
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            n = int(n)
            frames = stack.split(";")
            leaf = frames[-1]
            if any(k in leaf for k in IDLE_LEAVES):
                continue  # a thread waiting (event loop, pool workers, supervisor pings)
            agg["samples"] += n
            agg["leaf"][leaf] = agg["leaf"].get(leaf, 0) + n
            bucket = "other"
            for frame in reversed(frames):
                hit = next((b for b, keys in PROFILE_BUCKETS if any(k in frame for k in keys)), None)
                if hit:
                    bucket = hit
                    break
            agg["buckets"][bucket] = agg["buckets"].get(bucket, 0) + n
    for agg in out.values():
        tot = agg["samples"] or 1
        agg["buckets"] = {
            k: round(100 * v / tot, 1) for k, v in sorted(agg["buckets"].items(), key=lambda kv: -kv[1])
        }
        agg["leaf"] = {
            k: round(100 * v / tot, 1) for k, v in sorted(agg["leaf"].items(), key=lambda kv: -kv[1])[:8]
        }
    return out


def med(runs: list[dict], key: str) -> float:
    """Median of ``key`` over rounds."""
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")


def ratio_rounds(name: str, results: dict, key: str) -> list[float]:
    """Per-round ratio ours/stock of ``key``."""
    o, s = results[name]["rounds"]["ours"], results[name]["rounds"]["stock"]
    return [a[key] / b[key] if b[key] else float("nan") for a, b in zip(o, s, strict=True)]


# ---------------------------------------------------------------- table


def table(results: dict, args: argparse.Namespace) -> list[dict]:
    """Rows: case, ours, stock, ratio (median of per-round ratios), target, met."""
    rows = []

    def row(case, ours, stock, ratio, target, met, fmt="{:.1f}"):
        def f(v):
            return fmt.format(v) if isinstance(v, (int, float)) else (v if v is not None else "-")

        rows.append(
            {
                "case": case,
                "ours": f(ours),
                "stock": f(stock),
                "ratio": f"{ratio:.2f}" if isinstance(ratio, float) else (ratio or "-"),
                "target": target,
                "met": {True: "yes", False: "NO", None: "-"}[met],
            }
        )

    for name in (
        "item MS z14 (mid zoom)",
        "item MS z15 (max zoom)",
        "item pan z15 (mid zoom)",
        "item pan z17 (max zoom)",
        "mosaic z15-16 over the overlap",
    ):
        if name not in results:
            continue
        r = results[name]["rounds"]
        tr = statistics.median(ratio_rounds(name, results, "rps"))
        lr = statistics.median(ratio_rounds(name, results, "p50_ms"))
        err = sum(x["errors"] for x in r["ours"] + r["stock"])
        suffix = f" ({err} errors!)" if err else ""
        row(
            f"{name}: tiles/s, {results[name]['concurrency']} clients{suffix}",
            med(r["ours"], "rps"),
            med(r["stock"], "rps"),
            tr,
            ">= 2",
            tr >= 2,
        )
        if name.startswith("item"):
            row(
                f"{name}: p50 ms",
                med(r["ours"], "p50_ms"),
                med(r["stock"], "p50_ms"),
                lr,
                "<= 0.5",
                lr <= 0.5,
                "{:.0f}",
            )
        row(
            f"{name}: p95 ms",
            med(r["ours"], "p95_ms"),
            med(r["stock"], "p95_ms"),
            statistics.median(ratio_rounds(name, results, "p95_ms")),
            "",
            None,
            "{:.0f}",
        )
    if "workers" in results:
        w = results["workers"]["rounds"]
        for i, n in enumerate((1, 2)):
            o, st = w["ours"][i], w["stock"][i]
            row(
                f"item MS z16, {n} worker{'s' * (n > 1)}, 4 clients: tiles/s (fresh servers)",
                o["rps"],
                st["rps"],
                o["rps"] / st["rps"] if st["rps"] else None,
                "",
                None,
            )
        scale_o, scale_s = (
            w["ours"][1]["rps"] / w["ours"][0]["rps"],
            w["stock"][1]["rps"] / w["stock"][0]["rps"],
        )
        row("2 workers / 1 worker (2 cores)", scale_o, scale_s, None, "", None, "{:.2f}")
    name = "low zoom, whole collection"
    if name in results:
        r = results[name]["rounds"]
        o, s = r["ours"][0], r["stock"][0]
        lim = results[name]["timeout_s"] * 1000

        def show(x):
            if x["status"] == 0:
                return f"> {lim:.0f} (timeout)"
            return x["ms"] if x["status"] == 200 else f"HTTP {x['status']}"

        ratio = o["ms"] / s["ms"] if o["status"] == s["status"] == 200 else None
        row(
            f"low zoom tile z{o['tile'][0]}, whole collection in view, cold: ms",
            show(o),
            show(s),
            ratio,
            "ours < 1000 ms",
            o["status"] == 200 and o["ms"] < 1000,
            "{:.0f}",
        )
        row(
            "low zoom tile: files read / CPU s spent by then",
            f"{o['files']} / {o['cpu_s_at_answer_or_timeout']:.0f}",
            f"{s['files']} / {s['cpu_s_at_answer_or_timeout']:.0f}",
            None,
            f"<= {N_SCENES} files (items in view)",
            o["files"] <= N_SCENES,
        )
        if o["status"] == 0 or s["status"] == 0:
            row(
                "low zoom tile: CPU s in the 3 s after the client gave up",
                o["cpu_s_in_3s_after"],
                s["cpu_s_in_3s_after"],
                None,
                "~0 (request stops)",
                o["cpu_s_in_3s_after"] < 0.3 if o["status"] == 0 else None,
            )
    name = "preview 512 px"
    if name in results:
        r = results[name]["rounds"]
        pr = statistics.median(ratio_rounds(name, results, "p50_ms"))
        row(
            "item preview 512 px: p50 ms",
            med(r["ours"], "p50_ms"),
            med(r["stock"], "p50_ms"),
            pr,
            "<= 0.33",
            pr <= 1 / 3,
            "{:.0f}",
        )
        t = results["thumbnail 256 px (ours only)"]["rounds"]["ours"]
        row("item thumbnail 256 px (ours only): p50 ms", med(t, "p50_ms"), None, None, "", None, "{:.0f}")
    name = "repeated views (Zipf, 300 tiles)"
    if name in results:
        r = results[name]["rounds"]
        zr = statistics.median(ratio_rounds(name, results, "rps"))
        err = sum(x["errors"] for x in r["ours"] + r["stock"])
        row(
            f"repeated views, Zipf over 300 tiles, {args.clients} clients: req/s"
            + (f" ({err} errors!)" if err else ""),
            med(r["ours"], "rps"),
            med(r["stock"], "rps"),
            zr,
            ">= 10",
            zr >= 10,
        )
    if "origin" in results:
        for kind, per in results["origin"].items():
            o, s = per["ours"], per["stock"]
            row(
                f"origin requests, {kind}, cold (HEAD)",
                f"{o['cold']['requests']} ({o['cold']['head']})",
                f"{s['cold']['requests']} ({s['cold']['head']})",
                None,
                "<= 2 per file, no HEAD",
                (o["cold"]["max_per_file"] <= 2 and o["cold"]["head"] == 0),
            )
            row(
                f"origin KiB, {kind}, cold",
                o["cold"]["bytes"] / 1024,
                s["cold"]["bytes"] / 1024,
                o["cold"]["bytes"] / s["cold"]["bytes"] if s["cold"]["bytes"] else None,
                "",
                None,
                "{:.0f}",
            )
            row(
                f"origin requests, {kind}, warm-same",
                o["warm-same"]["requests"],
                s["warm-same"]["requests"],
                None,
                "0",
                o["warm-same"]["requests"] == 0,
                "{:d}",
            )
            row(
                f"origin requests, {kind}, warm-neighbour (max per file)",
                f"{o['warm-neighbour']['requests']} ({o['warm-neighbour']['max_per_file']})",
                f"{s['warm-neighbour']['requests']} ({s['warm-neighbour']['max_per_file']})",
                None,
                "<= 1 per file",
                o["warm-neighbour"]["max_per_file"] <= 1,
            )
    name = next((k for k in results if k.startswith("catalogue scale")), None)
    if name:
        r = results[name]["rounds"]
        o, s = med(r["ours"], "ratio"), med(r["stock"], "ratio")
        row(f"{name}: p50 big / p50 small", o, s, None, "ours <= 1.1", o <= 1.1, "{:.2f}")
        row(
            f"{name}: p50 ms with the big collection",
            med(r["ours"], "big_p50_ms"),
            med(r["stock"], "big_p50_ms"),
            med(r["ours"], "big_p50_ms") / med(r["stock"], "big_p50_ms"),
            "",
            None,
            "{:.0f}",
        )
    mem = results.get("memory", {})
    if "end" in mem:
        o = max(m["VmHWM"] for m in mem["end"]["ours"])
        s = max(m["VmHWM"] for m in mem["end"]["stock"])
        row("peak RSS per worker, MiB (VmHWM)", o, s, o / s, "<= 1", o <= s, "{:.0f}")
        if "after warm-up" in mem:
            a = max(m["VmRSS"] for m in mem["after warm-up"]["ours"])
            b = max(m["VmRSS"] for m in mem["end"]["ours"])
            a2 = max(m["VmRSS"] for m in mem["after warm-up"]["stock"])
            b2 = max(m["VmRSS"] for m in mem["end"]["stock"])
            row(
                f"RSS growth warm-up -> end of run ({results.get('measured_minutes', 0):.1f} min), %",
                100 * (b / a - 1),
                100 * (b2 / a2 - 1),
                None,
                "ours <= 10 %",
                b / a - 1 <= 0.10,
                "{:.0f}",
            )
    name = "raw stream"
    if name in results:
        st = results[name]
        r = st["rounds"]
        n = st["readers"]
        mib = st["file"]["size"] / MIB
        err = sum(x["errors"] for side in r.values() for x in side)
        suffix = f" ({err} errors!)" if err else ""
        for kind, what in (
            ("random", f"random 256 KiB-1 MiB ranges, {st['seconds']:g} s"),
            ("whole", f"whole file in 1 MiB ranges, passes for {st['seconds'] / 2:g} s"),
        ):
            ratio = statistics.median(st["ratios"][kind])
            row(
                f"raw stream {mib:.0f} MiB COG, {n} readers, {what}: MB/s "
                f"(stock column = nginx read directly: stock has no stream route){suffix}",
                statistics.median(x[kind]["MBps"] for x in r["ours"]),
                statistics.median(x[kind]["MBps"] for x in r["direct"]),
                ratio,
                ">= 0.8",
                ratio >= 0.8,
                "{:.0f}",
            )
        for kind, what in (
            (("random", "random ranges"), ("whole", "whole file")) if "ours-redirect" in r else ()
        ):
            ratio = statistics.median(st["ratios"][f"redirect {kind}"])
            row(
                f"raw stream, presigned redirect (`stream: redirect`, nginx secure_link storage), {what}: "
                "MB/s (stock column = nginx read directly)",
                statistics.median(x[kind]["MBps"] for x in r["ours-redirect"]),
                statistics.median(x[kind]["MBps"] for x in r["direct"]),
                ratio,
                ">= 0.8",
                ratio >= 0.8,
                "{:.0f}",
            )
        if "ours-redirect" in r:
            red = [x["origin"] for x in r["ours-redirect"]]
            row(
                "raw stream, presigned redirect: requests to ours (307) / ranges read from the storage, bytes equal",
                f"{sum(o['redirects'] for o in red)} / {sum(o['requests'] for o in red)}, "
                + ("yes" if all(o["bytes"] == o["client_bytes"] for o in red) else "NO"),
                None,
                None,
                "1 per reader per URL lifetime",
                all(o["bytes"] == o["client_bytes"] for o in red),
            )
        for kind in ("random", "whole") if "nginx-proxy" in r else ():
            ratio = statistics.median(st["ratios"][f"nginx-proxy {kind}"])
            row(
                f"reference: nginx as reverse proxy, {kind} ranges: MB/s (ours column = nginx proxy; "
                "stock column = nginx direct)",
                statistics.median(x[kind]["MBps"] for x in r["nginx-proxy"]),
                statistics.median(x[kind]["MBps"] for x in r["direct"]),
                ratio,
                "",
                None,
                "{:.0f}",
            )
        served = {who: sum(x["random"]["bytes"] + x["whole"]["bytes"] for x in r[who]) / 1e9 for who in r}
        row(
            "raw stream: CPU s per GB served (ours: our workers; stock column: nginx direct)",
            sum(sum(x["worker_cpu_s"].values()) for x in r["ours"]) / served["ours"],
            sum(x["nginx_cpu_s"] for x in r["direct"]) / served["direct"],
            None,
            "",
            None,
            "{:.2f}",
        )
        origin = [x["origin"] for x in r["ours"]]
        one_to_one = all(
            o["requests"] == o["client_requests"] and o["bytes"] == o["client_bytes"] and not o["head"]
            for o in origin
        )
        row(
            "raw stream: origin requests / client requests, bytes equal (ours)",
            f"{sum(o['requests'] for o in origin)} / {sum(o['client_requests'] for o in origin)}, "
            + ("yes" if all(o["bytes"] == o["client_bytes"] for o in origin) else "NO"),
            None,
            None,
            "1 per request, same bytes",
            one_to_one,
        )
        checked = [c for cs in st["checks"].values() for c in cs]
        row(
            "raw stream: sample ranges + whole file equal to the file on disk (ours, direct)",
            f"{sum(c['ok'] for c in st['checks']['ours'])}/{len(st['checks']['ours'])}",
            f"{sum(c['ok'] for c in st['checks']['direct'])}/{len(st['checks']['direct'])}",
            None,
            "all",
            all(c["ok"] for c in checked),
        )
        rss = st["rss"].values()
        rise = max(w["peak"] - w["start"] for w in rss)
        growth = max(w["round_ends"][-1] - w["round_ends"][0] for w in rss)
        row(
            f"raw stream: RSS per worker, MiB, start / peak / end ({len(st['rss'])} workers)",
            "; ".join(f"{w['start']:.0f} / {w['peak']:.0f} / {w['end']:.0f}" for w in rss),
            None,
            None,
            "peak - start <= 32",
            rise <= 32,
        )
        row(
            f"raw stream: RSS growth first -> last round end, MiB ({len(r['ours'])} rounds)",
            growth,
            None,
            None,
            "<= 8",
            growth <= 8,
            "{:+.1f}",
        )
    return rows


def print_table(rows: list[dict]) -> None:
    """Plain-text table on stdout."""
    cols = ["case", "ours", "stock", "ratio", "target", "met"]
    w = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(w[c]) for c in cols))
    print("-|-".join("-" * w[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w[c]) for c in cols))


#: the rows of the README's short table (`--markdown-summary`): substrings of their case
SUMMARY = (
    "tiles/s, 4 clients",
    "p50 ms",
    "cold (HEAD)",
    "whole collection in view, cold",
    "Zipf",
    "peak RSS",
    "presigned redirect, random",
)


def markdown_table(path: Path, summary: bool = False) -> str:
    """The Markdown table of a results JSON (docs/performance.md; ``summary``: the README's rows)."""
    doc = json.loads(path.read_text())
    meta, rows = doc["meta"], doc["table"]
    if summary:
        rows = [r for r in rows if any(k in r["case"] for k in SUMMARY) and "thumbnail" not in r["case"]]
    cols = ["case", "ours", "stock", "ratio", "target", "met"]
    lines = [
        f"<!-- generated by `benchmarks/run.py --markdown{'-summary' if summary else ''} {path.name}`; "
        f"{meta['date_utc']}, "
        f"{meta['machine']}, {meta['args']['workers']} workers, {meta['args']['rounds']} rounds -->",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = ["–" if str(r[c]) == "-" else str(r[c]).replace("|", "\\|") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main() -> int:
    """Run everything, print the table, write the JSON."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2, help="uvicorn workers per server")
    ap.add_argument("--rounds", type=int, default=4, help="alternated rounds per case")
    ap.add_argument("--tiles", type=int, default=24, help="distinct tiles per round and server")
    ap.add_argument("--concurrency", type=int, default=4, help="clients for the distinct-tile cases")
    ap.add_argument("--clients", type=int, default=16, help="clients for the repeated-view (Zipf) case")
    ap.add_argument("--zipf-seconds", type=float, default=8, help="duration of one Zipf round")
    ap.add_argument("--scale-items", type=int, default=1_000_000, help="items in the big collection")
    ap.add_argument(
        "--lowzoom-timeout", type=float, default=10, help="client timeout of the low-zoom tile (s)"
    )
    ap.add_argument("--scale-tiles", type=int, default=6, help="mosaic tiles per round in the scale case")
    ap.add_argument(
        "--profile", action="store_true", help="py-spy our workers during the distinct-tile and stream cases"
    )
    ap.add_argument("--skip", default="", help="comma-separated cases to leave out: " + ",".join(CASES))
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated cases to run, the others left out (`--only stream`: the raw streaming "
        "case alone, ~1 min, no stock server)",
    )
    ap.add_argument("--stream-readers", type=int, default=8, help="parallel range readers (stream case)")
    ap.add_argument(
        "--stream-seconds",
        type=float,
        default=4,
        help="random-range reading per round and side (stream case)",
    )
    ap.add_argument(
        "--stream-workers",
        type=int,
        default=None,
        help="uvicorn workers of ours in the stream case (--workers)",
    )
    ap.add_argument(
        "--stream-nginx-proxy",
        action="store_true",
        help="stream case: also read through nginx as a reverse proxy (the ceiling of a proxy on these cores; "
        "nginx then runs 2 workers)",
    )
    ap.add_argument(
        "--stream-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra variable for our server in the stream case (repeatable), e.g. TILER_STREAM_CHUNK_KB=256",
    )
    ap.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra variable for our server in every case (repeatable), e.g. TILER_READER_MULTIRANGE=false",
    )
    ap.add_argument(
        "--stock-env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra variable for stock titiler-pgstac in every case (repeatable), e.g. "
        "LD_PRELOAD=libjemalloc.so.2 to give stock our malloc too",
    )
    ap.add_argument(
        "--quick", action="store_true", help="2 rounds, fewer tiles, 20k-item scale case (~3 min)"
    )
    ap.add_argument("--no-redis", action="store_true", help="our tile cache without its shared Redis tier")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument(
        "--markdown",
        type=Path,
        metavar="RESULTS.json",
        help="print the Markdown table of a results JSON (runs nothing)",
    )
    ap.add_argument(
        "--markdown-summary",
        type=Path,
        metavar="RESULTS.json",
        help="print the README's short Markdown table of a results JSON (runs nothing)",
    )
    args = ap.parse_args()
    if args.markdown is not None or args.markdown_summary is not None:
        sys.stdout.write(
            markdown_table(args.markdown or args.markdown_summary, summary=args.markdown is None)
        )
        return 0

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    if args.quick:
        args.rounds, args.tiles, args.zipf_seconds, args.scale_items = 2, 12, 4, min(args.scale_items, 20_000)
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        only = set(filter(None, args.only.split(",")))
        if only - set(CASES):
            ap.error(
                f"--only: unknown case(s) {', '.join(sorted(only - set(CASES)))} (cases: {', '.join(CASES)})"
            )
        skip |= set(CASES) - only
    if args.stream_workers is None:
        args.stream_workers = args.workers
    if any("=" not in kv for kv in args.stream_env + args.ours_env + args.stock_env):
        ap.error("--stream-env, --ours-env and --stock-env take VAR=VALUE")
    OURS_ENV.update(dict(kv.split("=", 1) for kv in args.ours_env))
    STOCK_ENV.update(dict(kv.split("=", 1) for kv in args.stock_env))
    scenes = bool(set(CASES) - {"stream"} - skip)  # every case but stream reads the scenes
    shared = bool(SHARED_CASES - skip)
    py = sys.executable
    if shared and not (STOCK_VENV / "bin" / "python").exists():
        ap.error(
            f"stock titiler-pgstac is not installed in {STOCK_VENV}: run `bash benchmarks/setup.sh` first (`make bench` does)"
        )
    t_start = time.monotonic()
    BENCH.mkdir(exist_ok=True)

    cluster, (coll, items) = prepare_data(args.scale_items, scenes=scenes)
    stream_info = make_stream_cog(BENCH / "cogs") if "stream" not in skip else None
    nginx = start_nginx(BENCH / "cogs", proxy=args.stream_nginx_proxy and "stream" not in skip)
    global REDIS_URL
    redis = None if args.no_redis or not shared else start_redis()
    if redis is not None:
        REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
    procs: dict[str, Proc] = {}
    b = Bench(args, items)
    load_avg = os.getloadavg()
    try:
        if scenes:
            load_collections(cluster.dsn, coll, items, args.scale_items)
        if stream_info is not None:
            load_stream_collection(cluster.dsn, stream_info)
        t_setup = time.monotonic() - t_start
        if shared:
            procs = start_servers(args.workers, py)
            mallocs = {n: malloc_of(worker_pids(p.pid, args.workers)) for n, p in procs.items()}
            b.results["malloc"] = mallocs
            log(
                f"servers up: ours :{SERVER_PORTS['ours']}, stock :{SERVER_PORTS['stock']}, "
                f"{args.workers} workers each; malloc ours {mallocs['ours']}, stock {mallocs['stock']}"
            )
            b.procs = procs
            b.equivalence()
            # warm-up: imports, pools, TileMatrixSets; tiles outside the measured sets (z12)
            for srv in ("ours", "stock"):
                for it in items:
                    for t in tiles_in([it], 12)[:2] or covering_tiles([it], 1):
                        fetch(SERVER_PORTS[srv], b.item_tile(srv, it["id"], t, MS_RGB))
                        fetch(SERVER_PORTS[srv], b.mosaic_tile(COLLECTIONS[srv], t))
            b.memory_snapshot(procs, "after warm-up")
            t_measure = time.monotonic()
            load_avg = os.getloadavg()
            if "items" not in skip:
                b.item_cases()
            if "mosaic" not in skip:
                b.mosaic_case()
            if "preview" not in skip:
                b.preview_case()
            if "zipf" not in skip:
                b.zipf_case()
            if "scale" not in skip:
                b.scale_case()
            b.memory_snapshot(procs, "end")
            b.results["measured_minutes"] = (time.monotonic() - t_measure) / 60
            stop_servers(procs)
            procs = {}
        # origin counts and the cold low-zoom tile measure reads: no tile from the shared tier
        REDIS_URL = None
        if "origin" not in skip:
            b.origin_case(py)
        if "lowzoom" not in skip:
            b.low_zoom_case(py)
        if "workers" not in skip:
            b.workers_case(py)
        if stream_info is not None:
            b.stream_case(py, stream_info, nginx)
        if b.profiles:
            b.results["profile"] = profile_summary(b.profiles)
    finally:
        stop_servers(procs)
        nginx.stop()
        if redis is not None:
            redis.stop()
        cluster.stop()
    total = time.monotonic() - t_start
    rows = table(b.results, args)
    meta = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average_at_start": load_avg,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "setup_seconds": round(t_setup, 1),
        "total_seconds": round(total, 1),
        "redis_tier_for_ours": redis is not None,
        "data": f"{N_SCENES} scenes, MS {MS_SIZE} px 6 m 4-band uint16, pan {MS_SIZE * 4} px 1.5 m, 512 px blocks",
    }
    if stream_info is not None:
        meta["stream_data"] = (
            f"{STREAM_FILE}: {stream_info['size'] / MIB:.1f} MiB, {stream_info['shape'][0]} bands uint16 "
            f"{stream_info['shape'][2]} px, {stream_info['blocks'][0]} px blocks, {stream_info['compress']}, "
            f"overviews {stream_info['overviews']}"
        )
    print()
    if set(CASES) - skip == {"stream"}:
        print(f"dinamis-tiler raw streaming vs nginx read directly - {meta['date_utc']} - {meta['machine']}")
        print(
            f"{args.stream_workers} uvicorn worker(s), {args.rounds} alternated rounds, ratios ours/direct "
            f"(median of per-round ratios); load average at start {load_avg[0]:.1f}; run {total / 60:.1f} min"
        )
    else:
        print(f"dinamis-tiler vs stock titiler-pgstac 3.2.0 - {meta['date_utc']} - {meta['machine']}")
        print(
            f"{args.workers} uvicorn workers each, {args.rounds} alternated rounds, ratios ours/stock "
            f"(median of per-round ratios); load average at start {load_avg[0]:.1f}; run {total / 60:.1f} min"
        )
    if stream_info is not None:
        print(f"stream case: {meta['stream_data']}; stock column = nginx read directly")
    print()
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"meta": meta, "table": rows, "results": b.results}, indent=1, default=str))
    for case, agg in b.results.get("profile", {}).items():
        print(f"\nprofile of our workers, {case} ({agg['samples']} samples, % of non-idle samples):")
        print("  " + ", ".join(f"{k} {v}" for k, v in agg["buckets"].items()))
        print("  top frames: " + "; ".join(f"{k} {v}" for k, v in list(agg["leaf"].items())[:5]))
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
