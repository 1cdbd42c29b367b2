"""A private PostgreSQL+PostGIS+pgstac cluster for the demo and the tests.

`initdb` refuses to run as root, so when the current user is root the cluster
is created and run as the ``postgres`` system user (created by Debian's
``postgresql`` package). The data directory, socket and log live in one folder.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


def pg_bindir() -> Path:
    """Return the folder holding ``initdb`` and ``pg_ctl``."""
    for cand in PG_BIN_CANDIDATES:
        if (Path(cand) / "initdb").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: install postgresql-15 and postgresql-15-postgis-3"
    )


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in ``root`` listening on 127.0.0.1:``port``."""

    root: Path
    port: int
    dbname: str = "pgstac"
    superuser: str = "postgres"

    @property
    def datadir(self) -> Path:
        """PGDATA folder."""
        return self.root / "pgdata"

    @property
    def password_file(self) -> Path:
        """File holding the superuser password (mode 600)."""
        return self.root / "pgpassword"

    @property
    def password(self) -> str:
        """Superuser password, created on first use."""
        if not self.password_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.password_file.write_text(secrets.token_urlsafe(24))
            self.password_file.chmod(0o600)
        return self.password_file.read_text().strip()

    @property
    def dsn(self) -> str:
        """Connection string for the pgstac database."""
        return f"postgresql://{self.superuser}:{self.password}@127.0.0.1:{self.port}/{self.dbname}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def _run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner(argv), check=True, capture_output=True, text=True, **kw)

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.root.chmod(0o755)

    def is_running(self) -> bool:
        """True when the server answers on its socket."""
        if not (self.datadir / "PG_VERSION").exists():
            return False
        res = subprocess.run(
            self._as_owner([str(pg_bindir() / "pg_ctl"), "status", "-D", str(self.datadir)]),
            capture_output=True,
        )
        return res.returncode == 0

    def running_port(self) -> int | None:
        """Port of the running server, from its ``postmaster.pid`` (None when unreadable)."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().splitlines()[3])
        except (OSError, IndexError, ValueError):
            return None

    def init(self) -> None:
        """Create the cluster if it does not exist (idempotent)."""
        if (self.datadir / "PG_VERSION").exists():
            return
        self._prepare_root()
        pwfile = self.root / ".initpw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run(
                [
                    str(pg_bindir() / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    self.superuser,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        """Initialise if needed and start the server (idempotent)."""
        self.init()
        if self.is_running():
            return
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c max_connections=200 "
            "-c shared_buffers=128MB -c fsync=off -c synchronous_commit=off"
        )
        try:
            self._pg_ctl_start(opts)
        except subprocess.CalledProcessError as e:
            log = self.root / "postgres.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise RuntimeError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port}: "
                + (" | ".join(tail) or e.stderr or str(e))
            ) from None
        self._ensure_database()

    def _pg_ctl_start(self, opts: str) -> None:
        self._run(
            [
                str(pg_bindir() / "pg_ctl"),
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.datadir),
                "-l",
                str(self.root / "postgres.log"),
                "-o",
                opts,
            ]
        )

    def _ensure_database(self) -> None:
        import psycopg

        admin = self.dsn.rsplit("/", 1)[0] + "/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{self.dbname}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def migrate(self) -> str:
        """Install or upgrade pgstac (and PostGIS) in the database; return its version."""
        from pypgstac.db import PgstacDB
        from pypgstac.migrate import Migrate

        with PgstacDB(dsn=self.dsn) as db:
            return Migrate(db).run_migration()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server if it runs."""
        if self.is_running():
            self._run([str(pg_bindir() / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.datadir)])
