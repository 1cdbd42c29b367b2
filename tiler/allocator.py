"""jemalloc for the tile server: large buffers reused instead of faulted in again on every tile.

A tile allocates and frees several buffers of 128 KiB to a few MiB (GDAL's decoded blocks,
numpy arrays, the PNG rows). glibc's malloc either serves them from a heap whose freed holes
fragment (RSS creeps up for as long as the sizes vary), or, with its mmap threshold fixed
(``TILER_READER_MALLOC_MMAP_THRESHOLD_KB``, our glibc default), maps each one afresh and unmaps
it when freed: every page of every buffer is then a page fault and a page cleared by the
kernel. A perf profile of a worker on distinct MS z14 tiles put that at ~25 % of its CPU.
jemalloc keeps freed extents for reuse and hands them back to the system after
``dirty_decay_ms`` from a background thread, so RSS stays flat without the faults.

The allocator of a process is chosen when it starts (``LD_PRELOAD``): `tiler serve` and
`tiler demo` execute themselves again, once, with jemalloc preloaded when
``TILER_READER_ALLOCATOR=jemalloc`` (the default) and the library is installed (Debian:
``libjemalloc2``); the server's worker processes inherit it. The Docker image sets the same
variables itself. Without the library the server runs on glibc, with a warning.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

#: set in the environment of the process executed again, so that it never loops
MARKER = "TILER_ALLOCATOR_EXECUTED"


def library() -> str | None:
    """The shared library name of jemalloc (found by the dynamic loader), None when not installed."""
    return ctypes.util.find_library("jemalloc")


def active(pid: int | str = "self") -> str:
    """``jemalloc`` when process ``pid`` (this one by default) has it loaded, else ``glibc``."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "glibc"
    except OSError:  # not Linux
        return "glibc"


def environment(allocator: str, conf: str, env: Mapping[str, str]) -> dict[str, str] | None:
    """``env`` with jemalloc preloaded (and ``MALLOC_CONF`` unless set), or None when there is nothing to do.

    Nothing to do: glibc asked for, jemalloc already in ``LD_PRELOAD``, this process already
    executed again (`MARKER`), or no jemalloc installed (logged).
    """
    if allocator != "jemalloc" or MARKER in env or "jemalloc" in env.get("LD_PRELOAD", ""):
        return None
    lib = library()
    if lib is None:
        logger.warning("TILER_READER_ALLOCATOR=jemalloc but no libjemalloc is installed: glibc's malloc")
        return None
    out = dict(env)
    out["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    out.setdefault("MALLOC_CONF", conf)
    out[MARKER] = "1"
    return out


def execute_with_jemalloc(allocator: str, conf: str) -> None:
    """Execute this ``tiler`` command again with jemalloc preloaded (see `environment`); returns when not needed."""
    env = environment(allocator, conf, os.environ)
    if env is None:
        return
    logger.debug("executing again with %s preloaded", env["LD_PRELOAD"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tiler.cli", *sys.argv[1:]], env)


def forget_preload() -> None:
    """Take the preloaded jemalloc out of this process's ``LD_PRELOAD`` (it stays loaded here), for its children."""
    if MARKER not in os.environ:
        return
    lib = library()
    rest = " ".join(p for p in os.environ.get("LD_PRELOAD", "").split() if p != lib)
    if rest:
        os.environ["LD_PRELOAD"] = rest
    else:
        os.environ.pop("LD_PRELOAD", None)
