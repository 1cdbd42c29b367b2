"""Soak: a mixed, hostile workload against `tiler serve` for minutes, RSS per worker sampled.

Starts everything on 127.0.0.1 (a private PostgreSQL+pgstac cluster, SPOT-like sample scenes
on a Range HTTP server, `tiler serve --workers N` with access control off), then runs
``--clients`` threads for ``--duration`` seconds, each drawing requests from a mix: distinct
mosaic and item tiles of every preset, repeated tiles (Zipf over 300), previews, points,
TileJSON/WMTS, and bad input (oversized buffers and previews, broken expressions, unknown
grids, hostile CQL2). It reports the status histogram, every 5xx, latency percentiles,
and the resident memory of each worker: after warm-up, peak and at the end.

    .venv/bin/python benchmarks/soak.py --duration 300 --workers 2 --clients 16 --json out.json

Loopback only. Exit status 1 when a 5xx was seen or a worker's RSS grew by more than
``--max-growth`` (fraction) between the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import morecantile

from tiler.embedded import LocalCluster
from tiler.ingest import load
from tiler.rangeserver import RangeHTTPServer
from tiler.sample import COLLECTION_ID, generate

PRESETS = ["natural", "false-color", "ndvi", "panchromatic", "pansharpened"]
TMS = morecantile.tms.get("WebMercatorQuad")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB, (0, 0) when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def workers_of(pid: int) -> list[int]:
    """Uvicorn's worker processes: children of ``pid`` other than multiprocessing's helpers."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parts = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(parts[1]) == pid and b"resource_tracker" not in cmdline:
            out.append(int(stat.parent.name))
    return sorted(out)


class Workload:
    """Request paths drawn from the mix; deterministic for a seed."""

    def __init__(self, items: list[dict], seed: int):
        """Tiles over the sample scenes, at the zooms the data has."""
        self.rng = random.Random(seed)
        self.items = items
        w = min(it["bbox"][0] for it in items)
        s = min(it["bbox"][1] for it in items)
        e = max(it["bbox"][2] for it in items)
        n = max(it["bbox"][3] for it in items)
        self.bbox = (w, s, e, n)
        self.mosaic_tiles = [t for z in range(12, 18) for t in TMS.tiles(w, s, e, n, [z])]
        self.hot = self.rng.sample(self.mosaic_tiles, min(300, len(self.mosaic_tiles)))
        weights = [1 / (i + 1) for i in range(len(self.hot))]
        total = sum(weights)
        self.hot_weights = [x / total for x in weights]
        self.item_tiles = {
            it["id"]: [t for z in range(14, 18) for t in TMS.tiles(*it["bbox"], [z])] for it in items
        }

    def _tile(self, base: str, t: morecantile.Tile, preset: str) -> str:
        return f"{base}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png?preset={preset}"

    def next(self) -> tuple[str, str, str | None]:
        """(kind, path, JSON body or None)."""
        r = self.rng.random()
        coll = f"/collections/{COLLECTION_ID}"
        if r < 0.40:
            t = self.rng.choice(self.mosaic_tiles)
            return "mosaic-tile", self._tile(coll, t, self.rng.choice(PRESETS)), None
        if r < 0.60:
            t = self.rng.choices(self.hot, self.hot_weights)[0]
            return "repeated-tile", self._tile(coll, t, "natural"), None
        it = self.rng.choice(self.items)
        base = f"{coll}/items/{it['id']}"
        if r < 0.72:
            t = self.rng.choice(self.item_tiles[it["id"]])
            return "item-tile", self._tile(base, t, self.rng.choice(PRESETS)), None
        if r < 0.77:
            size = self.rng.choice([128, 256, 512, 1024])
            return "preview", f"{base}/preview.png?preset=natural&max_size={size}", None
        if r < 0.80:
            return "thumbnail", f"{base}/thumbnail.png?size={self.rng.choice([64, 128, 256])}", None
        if r < 0.84:
            lon = self.rng.uniform(it["bbox"][0], it["bbox"][2])
            lat = self.rng.uniform(it["bbox"][1], it["bbox"][3])
            return "point", f"{base}/point/{lon},{lat}?assets=ms", None
        if r < 0.88:
            return (
                "metadata",
                self.rng.choice(
                    [
                        f"{coll}/WebMercatorQuad/tilejson.json?preset=ndvi",
                        f"{coll}/WMTSCapabilities.xml",
                        "/collections",
                    ]
                ),
                None,
            )
        if r < 0.90:
            body = {
                "collections": [COLLECTION_ID],
                "filter-lang": "cql2-json",
                "filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, self.rng.randint(0, 100)]},
            }
            return "register", "/searches/register", json.dumps(body)
        t = self.rng.choice(self.mosaic_tiles)
        bad = self.rng.choice(
            [
                self._tile(coll, t, "natural") + "&buffer=10000",
                f"{base}/preview.png?assets=ms&max_size=100000",
                f"{base}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png?assets=ms&expression="
                + "b1%2B" * 3000
                + "b1",
                f"{base}/tiles/NoSuchGrid/1/1/1.png",
                self._tile(coll, t, "no-such-preset"),
                f"{coll}/tiles/WebMercatorQuad/40/1/1.png",
            ]
        )
        if self.rng.random() < 0.3:
            inner = json.dumps({"op": "=", "args": [{"property": "x';--"}, 1]})
            nested = '{"op": "not", "args": [' * 1000 + inner + "]}" * 1000
            return (
                "bad-input",
                "/searches/register",
                f'{{"collections": ["{COLLECTION_ID}"], "filter": {nested}}}',
            )
        return "bad-input", bad, None


def client_loop(port: int, wl: Workload, stop: threading.Event, results: list, lock: threading.Lock) -> None:
    """One keep-alive HTTP client sending requests until ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    local = []
    while not stop.is_set():
        if len(local) % 20 == 19:  # new connections now and then: the workers share the listening socket
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with lock:
            kind, path, body = wl.next()
        t0 = time.perf_counter()
        try:
            if body is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
            detail = data[:200].decode("utf-8", "replace") if status >= 500 else ""
        except (OSError, http.client.HTTPException) as e:
            status, detail = 599, f"{type(e).__name__}: {e}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        local.append((kind, status, time.perf_counter() - t0, path[:160] if status >= 500 else "", detail))
    conn.close()
    with lock:
        results.extend(local)


def main() -> int:  # noqa: C901 - a script
    """Run the soak and print its report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300, help="seconds of load after warm-up")
    ap.add_argument("--warmup", type=float, default=30, help="seconds of load before the RSS baseline")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--ms-size", type=int, default=1024, help="MS scene size in pixels (pan is 4x)")
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--json", type=Path, default=None, help="write the report here too")
    ap.add_argument(
        "--data-dir", type=Path, default=Path(".soak"), help="sample COGs are kept here between runs"
    )
    args = ap.parse_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    pg_root = Path(tempfile.mkdtemp(prefix="soak-pg-"))
    cluster = LocalCluster(pg_root, free_port())
    cogs = args.data_dir.resolve() / "cogs"
    server = tiler = None
    try:
        cluster.start()
        cluster.migrate()
        cog_port = free_port()
        cog_url = f"http://127.0.0.1:{cog_port}"
        _, items = generate(cogs, cog_url, n_scenes=args.scenes, ms_size=args.ms_size)
        server = RangeHTTPServer(cogs, port=cog_port)
        server.start_background()
        load(cluster.dsn, [cogs / "collection.json", cogs / "items.ndjson"], progress=False)

        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": cluster.dsn,
            "TILER_AUTH_ENABLED": "false",
            "TILER_DB_MAX_CONN": "8",
        }
        tiler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiler.cli",
                "--log-level",
                "WARNING",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(args.workers),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(args.data_dir / "serve.log", "w"),  # noqa: SIM115
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("tiler serve did not become healthy in 60 s (see serve.log)")
        workers = workers_of(tiler.pid) if args.workers > 1 else [tiler.pid]

        wl = Workload(items, args.seed)
        stop, lock, results = threading.Event(), threading.Lock(), []
        threads = [
            threading.Thread(target=client_loop, args=(port, wl, stop, results, lock), daemon=True)
            for _ in range(args.clients)
        ]
        t_start = time.monotonic()
        for t in threads:
            t.start()
        samples: list[tuple[float, dict[int, int]]] = []
        baseline: dict[int, int] = {}
        total = args.warmup + args.duration
        while (elapsed := time.monotonic() - t_start) < total:
            rss = {pid: rss_kib(pid)[0] for pid in workers}
            samples.append((elapsed, rss))
            if not baseline and elapsed >= args.warmup:
                baseline = dict(rss)
            time.sleep(5)
        stop.set()
        for t in threads:
            t.join(90)
        end = {pid: rss_kib(pid) for pid in workers}
        wall = time.monotonic() - t_start
    finally:
        if tiler is not None:
            os.killpg(tiler.pid, signal.SIGTERM)
            try:
                tiler.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(tiler.pid, signal.SIGKILL)
        if server is not None:
            server.shutdown()
        cluster.stop(mode="immediate")
        shutil.rmtree(pg_root, ignore_errors=True)

    statuses = Counter(s for _, s, _, _, _ in results)
    by_kind: dict[str, list[float]] = {}
    for kind, _, dt, _, _ in results:
        by_kind.setdefault(kind, []).append(dt)
    errors = [(k, s, p, d) for k, s, _, p, d in results if s >= 500]

    def pct(v: list[float], q: float) -> float:
        v = sorted(v)
        return v[min(len(v) - 1, int(q * len(v)))] * 1000

    report = {
        "duration_s": round(wall, 1),
        "workers": args.workers,
        "clients": args.clients,
        "requests": len(results),
        "requests_per_s": round(len(results) / wall, 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": errors[:20],
        "latency_ms": {
            k: {
                "n": len(v),
                "p50": round(pct(v, 0.5), 1),
                "p95": round(pct(v, 0.95), 1),
                "max": round(max(v) * 1000, 1),
            }
            for k, v in sorted(by_kind.items())
        },
        "rss_mib": {
            str(pid): {
                "after_warmup": round(baseline.get(pid, 0) / 1024, 1),
                "peak_sampled": round(max(s[1].get(pid, 0) for s in samples) / 1024, 1),
                "end": round(end[pid][0] / 1024, 1),
                "hwm": round(end[pid][1] / 1024, 1),
                "growth": round((end[pid][0] - baseline[pid]) / baseline[pid], 3)
                if baseline.get(pid)
                else None,
            }
            for pid in workers
        },
        "rss_series_mib": [
            [round(t, 0), *[round(r.get(pid, 0) / 1024, 1) for pid in workers]] for t, r in samples
        ],
    }
    print(
        f"soak: {report['requests']} requests in {report['duration_s']} s "
        f"({report['requests_per_s']}/s), {args.clients} clients, {args.workers} workers"
    )
    print("statuses:", report["statuses"])
    print(f"{'kind':15s} {'n':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for k, v in report["latency_ms"].items():
        print(f"{k:15s} {v['n']:6d} {v['p50']:8.1f} {v['p95']:8.1f} {v['max']:8.1f}")
    for pid, r in report["rss_mib"].items():
        print(
            f"worker {pid}: RSS after warm-up {r['after_warmup']} MiB, peak {r['peak_sampled']} MiB, "
            f"end {r['end']} MiB (growth {r['growth']}), high-water mark {r['hwm']} MiB"
        )
    for e in errors[:10]:
        print("5xx:", e)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    grown = [
        r["growth"]
        for r in report["rss_mib"].values()
        if r["growth"] is not None and r["growth"] > args.max_growth
    ]
    return 1 if errors or grown else 0


if __name__ == "__main__":
    raise SystemExit(main())
