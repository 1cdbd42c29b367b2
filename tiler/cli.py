"""``tiler`` command: serve, worker, demo, ingest, sample-data, migrate."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tiler.logs import configure_logging

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tiler.embedded import LocalCluster
    from tiler.rangeserver import RangeHTTPServer


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="Python log level.")
@click.pass_context
def cli(ctx: click.Context, log_level: str) -> None:
    """dinamis-tiler: dynamic tiles for SPOT 6/7 and Pléiades imagery in pgstac."""
    ctx.obj = {"log_level": log_level}
    configure_logging(log_level)


def _settings():  # noqa: ANN202 - tiler.settings.Settings, imported late
    """Settings from the environment; a clear message instead of a traceback when they are invalid."""
    from pydantic import ValidationError

    from tiler.settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise click.ClickException(f"invalid settings: {msgs}") from None


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", default=lambda: int(os.environ.get("PORT", "8000")), show_default="8000 or $PORT", type=int
)
@click.option("--workers", default=1, show_default=True, type=int)
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Serve an existing pgstac database (DATABASE_URL or PG* variables)."""
    import uvicorn

    from tiler.allocator import execute_with_jemalloc

    # each worker's pool counts against the database's connection budget (tiler.db.connection_budget)
    os.environ["TILER_DB_WORKERS"] = str(workers)
    settings = _settings()
    execute_with_jemalloc(settings.reader.allocator, settings.reader.jemalloc_conf)  # workers inherit it
    configure_logging(ctx.obj["log_level"], fmt=settings.observability.log_format)

    uvicorn.run(
        "tiler.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,  # tiler.access writes one line per request, with its id
    )


@cli.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(command: tuple[str, ...]) -> None:
    """Run COMMAND (e.g. gunicorn) with the malloc of TILER_READER_ALLOCATOR preloaded (the image's CMD)."""
    from tiler import allocator
    from tiler.settings import ReaderSettings

    reader = ReaderSettings()
    env = allocator.environment(reader.allocator, reader.jemalloc_conf, os.environ) or dict(os.environ)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as e:
        raise click.ClickException(f"cannot run {command[0]}: {e.strerror}") from None


@cli.command()
@click.option("--burst", is_flag=True, help="Stop when the queue is empty (tests, cron-style runs).")
@click.option("--name", default=None, help="Worker name in rq (default: host and pid).")
@click.pass_context
def worker(ctx: click.Context, burst: bool, name: str | None) -> None:
    """Run export jobs from the queue (TILER_JOBS_REDIS_URL); start as many as needed, anywhere."""
    from tiler.jobs import run_worker
    from tiler.process import configure_process
    from tiler.upstream import install, set_signers

    settings = _settings()
    if not settings.jobs.enabled:
        raise click.ClickException("TILER_JOBS_REDIS_URL is not set: there is no queue to work on")
    configure_logging(ctx.obj["log_level"], fmt=settings.observability.log_format)
    credentials = configure_process(settings)
    install(credentials)
    set_signers(credentials)
    run_worker(settings, burst=burst, name=name)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--dsn", envvar="DATABASE_URL", help="pgstac DSN (default: DATABASE_URL or PG* variables).")
@click.option(
    "--stats/--no-stats",
    default=True,
    show_default=True,
    help="Write per-band statistics (min, max, mean, stddev, valid %, 2nd/98th percentiles) "
    "into COG assets' raster:bands, read from an overview of about 1024 px.",
)
@click.option(
    "--recompute-stats",
    is_flag=True,
    help="Read every COG again, even when the documents or the database already have statistics.",
)
def ingest(paths: tuple[str, ...], dsn: str | None, stats: bool, recompute_stats: bool) -> None:
    """Validate then upsert STAC collections/items (JSON, NDJSON, static catalog) into pgstac."""
    from tiler.ingest import InvalidStac, load
    from tiler.settings import DatabaseSettings, GdalSettings

    if recompute_stats and not stats:
        raise click.UsageError("--recompute-stats and --no-stats contradict each other")
    dsn = dsn or DatabaseSettings().dsn
    try:
        ncoll, nitems = load(
            dsn,
            paths,
            stats=stats,
            recompute_stats=recompute_stats,
            gdal_options=GdalSettings().env_options(),
        )
    except InvalidStac as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"loaded {ncoll} collection(s) and {nitems} item(s)")


@cli.command("sample-data")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--base-url", default="http://127.0.0.1:8081", show_default=True, help="URL the COGs will be served from."
)
@click.option("--scenes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option(
    "--size",
    default=512,
    show_default=True,
    type=click.IntRange(64, 8192),
    help="MS width in pixels (pan is 4x).",
)
def sample_data(directory: Path, base_url: str, scenes: int, size: int) -> None:
    """Generate SPOT 6/7-like MS+pan COGs, STAC items and a collection in DIRECTORY."""
    from tiler.sample import generate

    coll, items = generate(directory, base_url, n_scenes=scenes, ms_size=size)
    click.echo(f"wrote {len(items)} scenes, {directory / 'collection.json'} and {directory / 'items.ndjson'}")


@cli.command()
@click.option("--dsn", envvar="DATABASE_URL", help="pgstac DSN (superuser or pgstac_admin).")
@click.option(
    "--grant-reader",
    "readers",
    multiple=True,
    metavar="ROLE",
    help="Grant pgstac_read to an existing ROLE (the tiler's, which also serves /stac). Repeatable.",
)
@click.option(
    "--grant-revocations",
    "revokers",
    multiple=True,
    metavar="ROLE",
    help="Let ROLE read and add token revocations (the tiler's role). Repeatable.",
)
def migrate(dsn: str | None, readers: tuple[str, ...], revokers: tuple[str, ...]) -> None:
    """Install or upgrade the pgstac schema, the mosaic search function and the token revocation table; grant roles."""
    from pypgstac.db import PgstacDB
    from pypgstac.migrate import Migrate

    from tiler import mosaicsearch
    from tiler.access import RevocationList
    from tiler.settings import DatabaseSettings

    dsn = dsn or DatabaseSettings().dsn
    with PgstacDB(dsn=dsn) as db:
        click.echo(f"pgstac {Migrate(db).run_migration()}")
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RevocationList.DDL)
        click.echo("tiler_auth.revoked_tokens ready")
        mosaicsearch.install(conn)
        click.echo("tiler_mosaic.geometrysearch ready")
        for role in readers:
            conn.execute(sql.SQL("GRANT pgstac_read TO {}").format(sql.Identifier(role)))
            click.echo(f"granted pgstac_read to {role}")
        for role in revokers:
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA tiler_auth TO {}").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT ON tiler_auth.revoked_tokens TO {}").format(
                    sql.Identifier(role)
                )
            )
            click.echo(f"granted token revocations to {role}")


@cli.command("apikey")
@click.option("--user", required=True, help="User the key belongs to.")
@click.option("--group", "groups", multiple=True, help="Group of the user (repeat).")
@click.option("--id", "key_id", default=None, help="Record id (default: <user>-<date>).")
def apikey(user: str, groups: tuple[str, ...], key_id: str | None) -> None:
    """Create an API key: prints the key once, and the record for TILER_AUTH_API_KEYS_FILE."""
    import datetime as dt

    import yaml

    from tiler.auth import hash_api_key, new_api_key

    key = new_api_key()
    record = {
        "id": key_id or f"{user}-{dt.date.today().isoformat()}",
        "sha256": hash_api_key(key),
        "user": user,
        "groups": list(groups),
    }
    click.echo(f"API key (shown once, give it to {user}): {key}", err=True)
    click.echo("Add to the `keys:` list of the API key file:", err=True)
    click.echo(yaml.safe_dump([record], sort_keys=False).rstrip())


# each port the demo listens on (127.0.0.1): (variable, CLI option, what listens there)
DEMO_PORTS = {
    "port": ("PORT", "--port", "tile server"),
    "cog_port": ("COG_PORT", "--cog-port", "COG file server"),
    "pg_port": ("PG_PORT", "--pg-port", "PostgreSQL"),
}


def _bind_error(port: int, host: str = "127.0.0.1") -> OSError | None:
    """Why ``host:port`` cannot be listened on now, or None when it can.

    With ``SO_REUSEADDR``, as uvicorn, http.server and PostgreSQL bind: a port left in
    TIME_WAIT is free, a port somebody listens on is not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e
    return None


def _port_message(key: str, port: int, err: OSError) -> str:
    var, opt, what = DEMO_PORTS[key]
    why = "is taken" if err.errno == errno.EADDRINUSE else f"cannot be used ({err.strerror})"
    return (
        f"port {port} on 127.0.0.1 ({what}) {why}: choose another with "
        f"{var}=<port> make demo (or tiler demo {opt} <port>)"
    )


def _check_demo_ports(ports: dict[str, int], cluster: LocalCluster) -> None:
    """Refuse to start, naming the port and its variable, when a port of the demo is taken.

    The demo's own PostgreSQL still running from an earlier run on the same port is not
    in the way: ``LocalCluster.start`` reuses it.
    """
    problems = []
    seen: dict[int, str] = {}
    for key, port in ports.items():
        var = DEMO_PORTS[key][0]
        if port in seen:
            problems.append(f"{seen[port]} and {var} are both {port}: give them different ports")
            continue
        seen[port] = var
        if key == "pg_port" and cluster.is_running():
            running = cluster.running_port()
            if running not in (port, None):
                problems.append(
                    f"the demo's PostgreSQL (data in {cluster.datadir}) is still running on port "
                    f"{running}: use PG_PORT={running} make demo, or stop it first "
                    f"(pg_ctl stop -D {cluster.datadir}, as the postgres user when you are root)"
                )
            continue
        err = _bind_error(port)
        if err is not None:
            problems.append(_port_message(key, port, err))
    if problems:
        raise click.ClickException("\n".join(problems))


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), help="Tile server port.  [default: 8000 or $PORT]")
@click.option(
    "--data-dir", default=".demo", show_default=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option(
    "--pg-port", type=click.IntRange(1, 65535), help="PostgreSQL port.  [default: 55432 or $PG_PORT]"
)
@click.option(
    "--cog-port", type=click.IntRange(1, 65535), help="COG file server port.  [default: 8081 or $COG_PORT]"
)
@click.option("--scenes", default=3, show_default=True, type=click.IntRange(1, 50))
@click.option(
    "--size", default=1024, show_default=True, type=click.IntRange(64, 8192), help="MS width in pixels."
)
def demo(
    port: int | None, data_dir: Path, pg_port: int | None, cog_port: int | None, scenes: int, size: int
) -> None:
    """Start PostgreSQL+pgstac, sample data, a COG range server and the tile server.

    Everything lives in DATA_DIR; Ctrl-C stops what was started. Running it
    again reuses the cluster and the generated COGs. The three ports (all on
    127.0.0.1) are checked before anything starts.
    """
    from pydantic import ValidationError

    from tiler import allocator
    from tiler.embedded import LocalCluster
    from tiler.settings import DemoSettings, ReaderSettings

    try:
        reader = ReaderSettings()
        allocator.execute_with_jemalloc(reader.allocator, reader.jemalloc_conf)
        allocator.forget_preload()  # one process: PostgreSQL, started from here, keeps its own malloc
        defaults = DemoSettings()
    except ValidationError as e:
        msgs = "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors())
        raise click.ClickException(f"invalid demo settings: {msgs}") from None
    ports = {
        "port": port or defaults.port,
        "cog_port": cog_port or defaults.cog_port,
        "pg_port": pg_port or defaults.pg_port,
    }
    data_dir = data_dir.resolve()
    cluster = LocalCluster(data_dir / "postgres", ports["pg_port"])
    try:
        _check_demo_ports(ports, cluster)
    except RuntimeError as e:  # no PostgreSQL server binaries
        raise click.ClickException(str(e)) from None

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # from here on SIGTERM unwinds like Ctrl-C
    log = logging.getLogger("tiler.demo")
    ranges: RangeHTTPServer | None = None
    serving = False
    try:
        log.info("starting PostgreSQL on 127.0.0.1:%d (data in %s)", cluster.port, cluster.datadir)
        try:
            with _signals_deferred():  # initdb and pg_ctl run on when only we are stopped
                cluster.start()
        except RuntimeError as e:
            raise click.ClickException(str(e)) from None
        ranges, item_id = _demo_data(cluster, data_dir / "cogs", ports["cog_port"], scenes, size)
        app, banner = _demo_app(cluster, data_dir, ports["port"], item_id)
        click.echo(banner)
        serving = True
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=ports["port"], log_config=None, access_log=False)
    except KeyboardInterrupt:
        if not serving:
            log.info("interrupted while starting")
            sys.exit(130)
    finally:  # whatever happened: stop what was started
        _stop_demo(ranges, cluster)
    sys.exit(0)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then raise KeyboardInterrupt.

    A child process (``initdb``, ``pg_ctl start``, run through ``runuser`` under root)
    is not stopped with us: interrupted mid-way, the cluster would come up after
    the demo stopped it, so the block runs to its end first.
    """
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, _: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            raise KeyboardInterrupt


def _stop_demo(ranges: RangeHTTPServer | None, cluster: LocalCluster) -> None:
    """Stop the COG server and PostgreSQL; a second Ctrl-C does not cut this short."""
    log = logging.getLogger("tiler.demo")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.info("stopping COG server and PostgreSQL")
    if ranges is not None:
        ranges.shutdown()
        ranges.server_close()
    try:
        cluster.stop()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        log.error("PostgreSQL did not stop (%s): pg_ctl stop -D %s", e, cluster.datadir)


def _demo_data(
    cluster: LocalCluster, cog_dir: Path, cog_port: int, scenes: int, size: int
) -> tuple[RangeHTTPServer, str]:
    """Install pgstac, write the sample scenes, serve them and load them.

    Returns the running COG server and the first item's id. Stops the server
    again when loading fails.
    """
    from tiler.ingest import load
    from tiler.metrics import ORIGIN
    from tiler.rangeserver import RangeHTTPServer
    from tiler.sample import generate

    log = logging.getLogger("tiler.demo")
    ORIGIN.enable()  # before ingest reads the COGs: GDAL decides once whether to count
    log.info("pgstac %s ready", cluster.migrate())
    cog_url = f"http://127.0.0.1:{cog_port}"
    log.info("generating %d sample scenes in %s", scenes, cog_dir)
    _, items = generate(cog_dir, cog_url, n_scenes=scenes, ms_size=size)
    try:
        ranges = RangeHTTPServer(cog_dir, port=cog_port)
    except OSError as e:  # taken since the check
        raise click.ClickException(_port_message("cog_port", cog_port, e)) from None
    ranges.start_background()
    log.info("serving COGs with Range support on %s", cog_url)
    try:
        # ingest reads the COGs through that server to compute their statistics
        load(cluster.dsn, [cog_dir / "collection.json", cog_dir / "items.ndjson"], progress=False)
    except BaseException:
        ranges.shutdown()
        ranges.server_close()
        raise
    return ranges, items[0]["id"]


def _demo_app(cluster: LocalCluster, data_dir: Path, port: int, item: str) -> tuple[FastAPI, str]:
    """The demo's app (access control on) and the text that shows where everything is."""
    from tiler.auth import mint_url_token
    from tiler.main import create_app
    from tiler.sample import COLLECTION_ID
    from tiler.settings import DatabaseSettings, Settings

    auth, api_key = _demo_auth(data_dir / "auth")
    app = create_app(Settings(db=DatabaseSettings(database_url=cluster.dsn), auth=auth))
    token, _ = mint_url_token(auth.keys(), sub="demo", groups=["demo-users"], ttl=7 * 86400)
    base = f"http://127.0.0.1:{port}/t/{token}"
    root = f"http://127.0.0.1:{port}"
    coll = COLLECTION_ID
    search_hint = (
        f"curl -s -X POST {root}/searches/register -H 'X-API-Key: {api_key}' -H 'Content-Type: application/json' "
        f"""-d '{json.dumps({"collections": [coll], "filter-lang": "cql2-json", "filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, 20]}})}'"""
    )
    banner = f"""
dinamis-tiler demo is starting on {root}
Access control is on (policy, API keys and signing key in {data_dir / "auth"}).
The URLs below carry a signed URL token for the demo user (valid 7 days):
paste them in a browser or QGIS as they are.
  landing page     {root}/
  browse (viewer)  {base}/viewer
  QGIS / WMTS, all collections {base}/WMTSCapabilities.xml
  API docs         {root}/api.html
  collection viewer {base}/collections/{coll}/WebMercatorQuad/map.html?preset=natural
  item viewer      {base}/collections/{coll}/items/{item}/WebMercatorQuad/map.html?preset=pansharpened
  XYZ template     {base}/collections/{coll}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}.png?preset=natural
  WMTS (a layer per preset and grid) {base}/collections/{coll}/WMTSCapabilities.xml
  item preview     {base}/collections/{coll}/items/{item}/preview.png?preset=false-color&max_size=512
  presets          {base}/collections/{coll}/presets   (natural, false-color, ndvi, panchromatic, pansharpened)
  demo API key     {api_key}
  QGIS layer URLs  curl -s -H 'X-API-Key: {api_key}' '{root}/auth/qgis?collection={coll}'
  STAC API         {base}/stac/  (items whose COG links are signed for you; pystac_client:
                   Client.open("{root}/stac", headers={{"X-API-Key": "{api_key}"}}))
  a raw COG to stream (QGIS "Add Raster Layer", GDAL /vsicurl/, rasterio): the `href` of
                   curl -s -H 'X-API-Key: {api_key}' '{root}/stac/collections/{coll}/items/{item}' | jq .assets.ms.href
  register a search mosaic:
    {search_hint}
Ctrl-C stops the tile server, the COG server and PostgreSQL.
"""
    return app, banner


DEMO_POLICY = """\
# Rights policy of the demo (see docs/access-control.md).
groups:
  demo-users:            # the demo API key and URL tokens
    - collections: ["*"]
  metacatalogue:         # anonymous callers: small previews and metadata only
    - collections: [spot67-demo]
      operations: [preview, metadata]
      max_preview_size: 512
anonymous: [metacatalogue]
"""


def _demo_auth(directory: Path):  # noqa: ANN202 - returns (AuthSettings, key)
    """Policy, API key file and signing key of the demo, created once (mode 600)."""
    import secrets

    import yaml

    from tiler.auth import hash_api_key, new_api_key
    from tiler.settings import AuthSettings

    directory.mkdir(parents=True, exist_ok=True)
    policy, keys, key_file, secret_file = (
        directory / "policy.yaml",
        directory / "api-keys.yaml",
        directory / "demo-api-key",
        directory / "signing-key",
    )
    if not policy.exists():
        policy.write_text(DEMO_POLICY)
    if not key_file.exists():
        key = new_api_key()
        key_file.write_text(key)
        record = {"id": "demo", "sha256": hash_api_key(key), "user": "demo", "groups": ["demo-users"]}
        keys.write_text(yaml.safe_dump({"keys": [record]}, sort_keys=False))
    if not secret_file.exists():
        secret_file.write_text("demo:" + secrets.token_urlsafe(32))
    for f in (key_file, secret_file, keys):
        f.chmod(0o600)
    settings = AuthSettings(
        enabled=True,
        policy_file=str(policy),
        api_keys_file=str(keys),
        signing_keys=secret_file.read_text().strip(),
    )
    return settings, key_file.read_text().strip()


if __name__ == "__main__":
    cli()
