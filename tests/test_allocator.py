"""tiler.allocator: `tiler serve`, `tiler exec` and their workers run on jemalloc, by the setting."""

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tiler import allocator
from tiler.settings import ReaderSettings

pytestmark = pytest.mark.skipif(allocator.library() is None, reason="libjemalloc2 is not installed")

CONF = "narenas:2"
PROBE = "from tiler import allocator; import os; print(allocator.active(), os.environ.get('MALLOC_CONF'))"


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                status = (d / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.append(int(d.name))
    return out


def has_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def test_environment_preloads_once():
    env = {"PATH": "/usr/bin", "LD_PRELOAD": "libfoo.so"}
    out = allocator.environment("jemalloc", CONF, env)
    assert out["LD_PRELOAD"].split() == [allocator.library(), "libfoo.so"]  # the other preload kept
    assert out["MALLOC_CONF"] == CONF and out[allocator.MARKER] == "1"
    assert allocator.environment("jemalloc", CONF, out) is None  # never twice
    assert allocator.environment("glibc", CONF, env) is None
    mine = allocator.environment("jemalloc", CONF, {"MALLOC_CONF": "narenas:1"})
    assert mine["MALLOC_CONF"] == "narenas:1"  # the operator's own configuration wins
    assert allocator.environment("jemalloc", CONF, {"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None


def test_tiler_exec_runs_the_command_on_the_setting_s_malloc():
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.MARKER)}
    cmd = [sys.executable, "-m", "tiler.cli", "exec", sys.executable, "-c", PROBE]
    out = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[0] == "jemalloc" and out[1] == ReaderSettings().jemalloc_conf
    env = dict(base, TILER_READER_ALLOCATOR="glibc")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["glibc", "None"]
    missing = subprocess.run(
        [sys.executable, "-m", "tiler.cli", "exec", "no-such-program-here"],
        env=base,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "cannot run no-such-program-here" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("choice", ["jemalloc", "glibc"])
def test_tiler_serve_workers_inherit_it(cluster, dsn, sample, choice):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TILER_", "LD_PRELOAD", "MALLOC_CONF"))}
    env.update(DATABASE_URL=dsn, TILER_AUTH_ENABLED="false", TILER_READER_ALLOCATOR=choice)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tiler.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "tiler serve did not start"
                time.sleep(0.3)
        workers = [
            p
            for p in children(proc.pid)
            if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(workers) == 2
        want = choice == "jemalloc"
        assert has_jemalloc(proc.pid) is want  # the same pid: executed again in place
        assert [has_jemalloc(p) for p in workers] == [want, want]
        item = sample.item(0)
        r = httpx.get(
            f"http://127.0.0.1:{port}/collections/{item['collection']}/items/{item['id']}/preview.png",
            params={"assets": "ms|bidx=3,2,1", "rescale": "200,1800", "max_size": 128},
            timeout=30,
        )
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)


def test_forget_preload_keeps_other_preloads():
    code = (
        "import os; from tiler import allocator; allocator.forget_preload(); "
        "print(allocator.active(), os.environ.get('LD_PRELOAD', '-'))"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.MARKER)}
    env = allocator.environment("jemalloc", CONF, base)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["jemalloc", "-"]  # still loaded here, not handed to children
