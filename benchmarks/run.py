"""``make bench``: dinamis-tiler side by side with stock titiler-pgstac, same data, same run.

What it sets up (everything under ``.bench/``, loopback only, nothing downloaded at run time):

* a private PostgreSQL+PostGIS+pgstac cluster (`tiler.embedded.LocalCluster`, port 55433);
* 3 overlapping SPOT 6/7-like scenes (`tiler.sample.generate`, 4-band uint16 6 m MS 1024 px,
  1.5 m pan 4096 px, 512 px blocks, deflate) in ``.bench/cogs``;
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

Cases run in alternation (ours, stock, then stock, ours, ...) for ``--rounds`` rounds; each
round uses tiles not requested before in the run (the same tiles for both servers), and the
ratio ours/stock is taken per round, then the median. Prints a table and writes
``benchmarks/results/<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCH = ROOT / ".bench"
STOCK_VENV = BENCH / "stock-venv"
PG_PORT = 55433
NGINX_PORTS = {"ours": 18081, "stock": 18082, "scale-small": 18083, "scale-big": 18084}
SERVER_PORTS = {"ours": 18000, "stock": 18001}
COLLECTIONS = {"ours": "bench-ours", "stock": "bench-stock"}
REDIS_PORT = 18090
SCALE = ("scale-small", "scale-big")  # scale-big is named scale-<count> in pgstac


def scale_ids(n: int) -> tuple[str, str]:
    """Collection ids of the scale case: one big collection per size, so runs of other sizes keep theirs."""
    return "scale-small", f"scale-{n}"


MS_SIZE = 1024
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


def start_nginx(cogs: Path) -> Proc:
    """One nginx, one server block per reader, each with its own access log."""
    d = BENCH / "nginx"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    servers = "\n".join(
        f"""  server {{
    listen 127.0.0.1:{port};
    root {cogs};
    access_log {d / (name + ".log")} ranges;
    location / {{ try_files $uri =404; }}
  }}"""
        for name, port in NGINX_PORTS.items()
    )
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = f"""{user}worker_processes 1;
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
{servers}
}}
"""
    (d / "nginx.conf").write_text(conf)
    for name in NGINX_PORTS:
        (d / f"{name}.log").write_text("")
    for port in NGINX_PORTS.values():
        ensure_free(port)
    exe = shutil.which("nginx") or "/usr/sbin/nginx"  # /usr/sbin is not on every user's PATH
    p = Proc("nginx", [exe, "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"), "-p", str(d)])
    some = next(iter(sorted(cogs.glob("*_QL.tif")))).name
    for port in NGINX_PORTS.values():
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


def prepare_data(scale_items: int) -> tuple[object, list[dict]]:
    """Cluster, COGs, collections; returns (cluster, items as generated)."""
    from tiler.embedded import LocalCluster
    from tiler.sample import generate

    cluster = LocalCluster(BENCH / "postgres", PG_PORT)
    cluster.start()
    log(f"pgstac {cluster.migrate()} on 127.0.0.1:{PG_PORT}")
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


def start_servers(workers: int, py: str, only: str | None = None) -> dict[str, Proc]:
    """dinamis-tiler and stock titiler-pgstac on loopback, ``workers`` each; waits until both answer."""
    from tiler.embedded import LocalCluster

    dsn = LocalCluster(BENCH / "postgres", PG_PORT).dsn
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("TILER_", "GDAL_", "VSI_", "CPL_"))}
    base_env["DATABASE_URL"] = dsn
    ours_env = dict(base_env, TILER_AUTH_ENABLED="false", PYTHONPATH=str(ROOT))
    if REDIS_URL:
        ours_env["TILER_CACHE_REDIS_URL"] = REDIS_URL
    stock_env = dict(base_env, **STOCK_GDAL)
    stock_env.pop("PYTHONPATH", None)
    specs = {
        "ours": (
            "ours",
            [
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
    procs = {n: Proc(*spec) for n, spec in specs.items() if only in (None, n)}
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

    def spy_start(self, case: str) -> list:
        """py-spy on each of our workers (``--profile``), raw collapsed stacks."""
        if not self.args.profile or self.procs is None:
            return []
        exe = shutil.which("py-spy") or str(STOCK_VENV / "bin" / "py-spy")
        spies = []
        for pid in worker_pids(self.procs["ours"].pid, self.args.workers):
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
    return rows


def print_table(rows: list[dict]) -> None:
    """Plain-text table on stdout."""
    cols = ["case", "ours", "stock", "ratio", "target", "met"]
    w = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(w[c]) for c in cols))
    print("-|-".join("-" * w[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(w[c]) for c in cols))


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
        "--profile", action="store_true", help="py-spy our workers during the distinct-tile cases"
    )
    ap.add_argument(
        "--skip", default="", help="comma-separated: items,mosaic,lowzoom,preview,zipf,scale,origin,workers"
    )
    ap.add_argument(
        "--quick", action="store_true", help="2 rounds, fewer tiles, 20k-item scale case (~3 min)"
    )
    ap.add_argument("--no-redis", action="store_true", help="our tile cache without its shared Redis tier")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    if args.quick:
        args.rounds, args.tiles, args.zipf_seconds, args.scale_items = 2, 12, 4, min(args.scale_items, 20_000)
    skip = set(filter(None, args.skip.split(",")))
    py = sys.executable
    t_start = time.monotonic()
    BENCH.mkdir(exist_ok=True)

    cluster, (coll, items) = prepare_data(args.scale_items)
    nginx = start_nginx(BENCH / "cogs")
    global REDIS_URL
    redis = None if args.no_redis else start_redis()
    if redis is not None:
        REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
    procs: dict[str, Proc] = {}
    try:
        load_collections(cluster.dsn, coll, items, args.scale_items)
        t_setup = time.monotonic() - t_start
        procs = start_servers(args.workers, py)
        log(
            f"servers up: ours :{SERVER_PORTS['ours']}, stock :{SERVER_PORTS['stock']}, {args.workers} workers each"
        )
        b = Bench(args, items)
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
        if b.profiles:
            b.results["profile"] = profile_summary(b.profiles)
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
    print()
    print(f"dinamis-tiler vs stock titiler-pgstac 3.2.0 - {meta['date_utc']} - {meta['machine']}")
    print(
        f"{args.workers} uvicorn workers each, {args.rounds} alternated rounds, ratios ours/stock "
        f"(median of per-round ratios); load average at start {load_avg[0]:.1f}; run {total / 60:.1f} min"
    )
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
