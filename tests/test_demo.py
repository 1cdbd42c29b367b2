"""`tiler demo` (what `make demo` runs): ports checked before anything starts, everything stopped after."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tiler.embedded import LocalCluster

PORT_VARS = ("PORT", "COG_PORT", "PG_PORT")


@pytest.fixture()
def data_dir() -> Iterator[Path]:
    """A folder for the demo's cluster; traversable by the `postgres` user the cluster runs as under root."""
    d = Path(tempfile.mkdtemp(prefix="tiler-demo-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def demo_env(**ports: int) -> dict[str, str]:
    """The environment with free ports for the three variables, overridden by ``ports``."""
    env = {k: v for k, v in os.environ.items() if k not in PORT_VARS}
    return env | {var: str(ports.get(var) or free_port()) for var in PORT_VARS}


def demo(data_dir: Path, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiler.cli",
            "demo",
            "--data-dir",
            str(data_dir),
            "--scenes",
            "1",
            "--size",
            "64",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def assert_nothing_left(data_dir: Path, env: dict[str, str], held: str | None = None) -> None:
    """No PostgreSQL runs on the demo's folder, and the ports (but the one the test holds) are free."""
    cluster = LocalCluster(data_dir / "postgres", int(env["PG_PORT"]))
    assert not (cluster.datadir / "postmaster.pid").exists()
    assert not cluster.is_running()  # pg_ctl status: no server
    for var in set(PORT_VARS) - {held}:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", int(env[var])))  # free again


@pytest.mark.parametrize(
    ("var", "what"), [("PORT", "tile server"), ("COG_PORT", "COG file server"), ("PG_PORT", "PostgreSQL")]
)
def test_taken_port_is_named_before_anything_starts(data_dir, var, what):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = demo_env(**{var: port})
        start = time.monotonic()
        proc = demo(data_dir, env)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 15  # nothing was started: no initdb, no sample data
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert f"port {port} " in lines[0] and f"({what}) is taken" in lines[0]
    assert f"{var}=<port> make demo" in lines[0]
    assert not (data_dir / "postgres").exists() and not (data_dir / "cogs").exists()
    assert_nothing_left(data_dir, env)


def test_same_port_twice_and_bad_values_are_refused(data_dir):
    port = free_port()
    proc = demo(data_dir, demo_env(PORT=port, COG_PORT=port))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert f"PORT and COG_PORT are both {port}" in err

    proc = demo(data_dir, demo_env() | {"COG_PORT": "eighty"})
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "COG_PORT" in err and "integer" in err
    assert not (data_dir / "postgres").exists()


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_ports_from_the_environment_and_everything_stopped_on_sigterm(data_dir):
    env = demo_env()
    base = f"http://127.0.0.1:{env['PORT']}"
    proc = demo(data_dir, env)
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/livez", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(up, proc)
        # the COG server is on COG_PORT and the items point to it
        r = httpx.get(f"http://127.0.0.1:{env['COG_PORT']}/collection.json", timeout=5)
        assert r.status_code == 200
        assert f"http://127.0.0.1:{env['COG_PORT']}/" in (data_dir / "cogs" / "items.ndjson").read_text()
        assert LocalCluster(data_dir / "postgres", int(env["PG_PORT"])).running_port() == int(env["PG_PORT"])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"{base}/" in out  # the banner
    assert "Traceback" not in err
    assert "stopping COG server and PostgreSQL" in err
    assert_nothing_left(data_dir, env)


def test_sigterm_while_starting_stops_postgresql(data_dir):
    env = demo_env()
    proc = demo(data_dir, env)
    pid_file = data_dir / "postgres" / "pgdata" / "postmaster.pid"
    try:
        _wait_for(pid_file.exists, proc)  # PostgreSQL started; the demo is not serving yet
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopping COG server and PostgreSQL" in err
    assert_nothing_left(data_dir, env)


def test_port_taken_after_the_check_stops_postgresql(data_dir):
    """A port taken while the demo starts (after the check): the same message, and PostgreSQL stopped."""
    env = demo_env()
    proc = demo(data_dir, env)
    pid_file = data_dir / "postgres" / "pgdata" / "postmaster.pid"
    with socket.socket() as busy:
        try:
            _wait_for(pid_file.exists, proc)  # the COG server binds only after pgstac and the sample data
            busy.bind(("127.0.0.1", int(env["COG_PORT"])))
            busy.listen()
        finally:
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        assert f"Error: port {env['COG_PORT']} on 127.0.0.1 (COG file server)" in err
        assert "COG_PORT=<port> make demo" in err
        assert_nothing_left(data_dir, env, held="COG_PORT")
