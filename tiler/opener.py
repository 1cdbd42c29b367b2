"""COGs of known size read without GDAL's size probe: two origin requests when cold.

GDAL's ``/vsicurl/`` asks a plain HTTP(S) host for a file's size before its first range
(a HEAD, or a GET it aborts after the headers): a cold tile costs HEAD, header and data.
The STAC item already says the size (``file:size``) and how many bytes precede the first
tile (``file:header_size``), so `SigningReader` opens such files through a rasterio opener
(rasterio's Python VSI plugin, one handler for the process: `vsi_path`) instead: GDAL
learns the size from `KnownSizeOpener.size` and the first read fetches the whole header in
one GET.

What ``/vsicurl/`` does for the reads after that is done here the same way:

* files are read in 16 KiB chunks kept in a process-wide LRU (`CHUNKS`, bounded by
  ``TILER_GDAL_CPL_VSIL_CURL_CACHE_SIZE``); consecutive missing chunks are one GET;
* GDAL's multi-range reads (the blocks of a window) come to `RangeFile.get_byte_ranges`;
  touching ranges are merged (``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES``), gaps never fetched,
  the merged ranges' GETs sent in parallel;
* requests go on keep-alive connections of each thread (`_Connections`); retries, delays
  and timeouts are GDAL's settings (`configure`), each attempt cut by the request's deadline
  (`tiler.deadline.Budget`); redirects are not followed and proxy variables ignored;
  credential headers and signers are those of `tiler.upstream` (a 401/403 is signed again
  once with ``refresh=True``);
* requests and bytes are counted in ``tiler_origin_requests_total``/``tiler_origin_bytes_total``.

rasterio swallows what its read callbacks raise (and an exception escaping one corrupts
the interpreter's error state), so a failure is recorded on the opener (`KnownSizeOpener.error`),
the read answers short (GDAL then fails the read) and `SigningReader` raises the recorded
failure as the `tiler.errors.UpstreamError` its HTTP status says.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import ssl
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

import rasterio

try:  # rasterio 1.4's Python VSI plugin (private: checked by `SUPPORTED`)
    from rasterio import _vsiopener
    from rasterio.abc import MultiByteRangeResourceContainer
except ImportError:  # pragma: no cover - another rasterio
    _vsiopener = MultiByteRangeResourceContainer = None

from tiler.deadline import Budget
from tiler.metrics import ORIGIN_BYTES, ORIGIN_REQUESTS

logger = logging.getLogger(__name__)

#: bytes per cached chunk (as /vsicurl/)
CHUNK = 16384


class ChunkCache:
    """16 KiB chunks of remote files, least recently used first out, ``max_bytes`` in all."""

    def __init__(self, max_bytes: int = 32_000_000) -> None:
        """Hold at most ``max_bytes`` of chunk data."""
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._chunks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.nbytes = 0

    def get(self, key: str, first: int, last: int) -> dict[int, bytes]:
        """The chunks ``first..last`` of file ``key`` that are held, by index."""
        out = {}
        with self._lock:
            for i in range(first, last + 1):
                data = self._chunks.get((key, i))
                if data is not None:
                    self._chunks.move_to_end((key, i))
                    out[i] = data
        return out

    def put(self, key: str, first: int, data: bytes) -> None:
        """Keep ``data`` (chunks ``first``, ``first + 1``... of file ``key``; the last may be short)."""
        if self.max_bytes <= 0:
            return
        with self._lock:
            for n, start in enumerate(range(0, len(data), CHUNK)):
                k = (key, first + n)
                old = self._chunks.pop(k, None)
                if old is not None:
                    self.nbytes -= len(old)
                piece = data[start : start + CHUNK]
                self._chunks[k] = piece
                self.nbytes += len(piece)
            while self.nbytes > self.max_bytes and self._chunks:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= len(dropped)

    def usage(self) -> tuple[int, int]:
        """Bytes held now, and the bound."""
        with self._lock:
            return self.nbytes, self.max_bytes

    def discard(self, prefix: str | None = None) -> None:
        """Forget the chunks of files whose key starts with ``prefix`` (all when None)."""
        with self._lock:
            if prefix is None:
                self._chunks.clear()
                self.nbytes = 0
                return
            for k in [k for k in self._chunks if k[0].startswith(prefix)]:
                self.nbytes -= len(self._chunks.pop(k))

    def __len__(self) -> int:
        """Chunks held."""
        return len(self._chunks)


class _Config:
    """GDAL's HTTP settings as the opener applies them (`configure`)."""

    enabled = True
    timeout = 8.0
    connect_timeout = 3.0
    max_retry = 2
    retry_delay = 0.5
    retry_codes: frozenset[int] = frozenset({429, 500, 502, 503, 504})
    ingested_bytes = 32768
    multirange = True


CONFIG = _Config()
CHUNKS = ChunkCache()
#: parallel GETs of one multi-range read (GDAL sends them multiplexed)
_parallel = ThreadPoolExecutor(max_workers=32, thread_name_prefix="tiler-opener")


def configure(gdal: Any, enabled: bool = True, multirange: bool = True) -> None:
    """Apply GDAL's settings (`tiler.settings.GdalSettings`) to the opener; ``enabled`` turns it on or off.

    It stays off, with a warning, when this rasterio lacks the private opener internals it
    relies on (`SUPPORTED`): every file is then read through GDAL's /vsicurl/.
    """
    if enabled and not SUPPORTED:
        logger.warning(
            "rasterio %s lacks the opener internals tiler.opener needs: "
            "files of known size are read through GDAL's /vsicurl/ (one HEAD more per cold file)",
            rasterio.__version__,
        )
    CONFIG.enabled = enabled and SUPPORTED
    CONFIG.timeout = float(gdal.gdal_http_timeout) or 1e9  # 0: no timeout, as GDAL
    CONFIG.connect_timeout = float(gdal.gdal_http_connecttimeout) or CONFIG.timeout
    CONFIG.max_retry = int(gdal.gdal_http_max_retry)
    CONFIG.retry_delay = float(gdal.gdal_http_retry_delay)
    CONFIG.retry_codes = frozenset(int(c) for c in str(gdal.gdal_http_retry_codes).split(",") if c.strip())
    CONFIG.ingested_bytes = int(gdal.gdal_ingested_bytes_at_open)
    CONFIG.multirange = multirange
    NO_MULTIRANGE.clear()
    CHUNKS.max_bytes = int(gdal.cpl_vsil_curl_cache_size)
    CHUNKS.discard()
    _CONNECTIONS.renew()


class _Connections(threading.local):
    """Keep-alive connections of this thread, one per origin (``scheme://host:port``).

    ``http.client`` on a connection of the thread's own: measured on 127.0.0.1 it takes
    0.7 ms for a 16 KiB range and 0.9 ms for 400 KiB where ``httpx`` takes 1.1 and 1.8 ms.
    It follows no redirect and reads no proxy variable. `renew` (at `configure`) makes
    every thread open new connections.
    """

    generation = 0
    _renewed = [0]  # shared by all threads
    _tls: ssl.SSLContext | None = None

    def __init__(self) -> None:
        self.conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self.generation = self._renewed[0]

    def renew(self) -> None:
        self._renewed[0] += 1

    def get(self, scheme: str, netloc: str, fresh: bool) -> http.client.HTTPConnection:
        if self.generation != self._renewed[0]:
            for c in self.conns.values():
                c.close()
            self.conns.clear()
            self.generation = self._renewed[0]
        key = (scheme, netloc)
        conn = self.conns.get(key)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        host = netloc.rsplit("@", 1)[-1]
        if scheme == "https":
            if _Connections._tls is None:
                _Connections._tls = ssl.create_default_context()
            conn = http.client.HTTPSConnection(
                host, timeout=CONFIG.connect_timeout, context=_Connections._tls
            )
        else:
            conn = http.client.HTTPConnection(host, timeout=CONFIG.connect_timeout)
        self.conns[key] = conn
        return conn


_CONNECTIONS = _Connections()


class OriginError(Exception):
    """A failed origin request, worded as GDAL words them (`tiler.errors.classify_upstream` reads it)."""


class SizeMismatch(OriginError):
    """The storage's file is not the size its STAC item says (``Content-Range`` total)."""


#: (href, file:size) pairs found wrong: read through /vsicurl/ from then on (bounded)
WRONG_SIZES: set[tuple[str, int]] = set()

#: hosts (``scheme://host:port``) that answered a multi-range GET with something else than the
#: ranges (a whole file, the first range only, a 416): one GET per range for them from then on
NO_MULTIRANGE: set[str] = set()

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PART_RANGE = re.compile(rb"(?im)^content-range:[ \t]*bytes[ \t]+(\d+)-(\d+)/(\d+|\*)")


def _byteranges(content_type: str, body: bytes) -> dict[int, bytes] | None:
    """The parts of a ``multipart/byteranges`` body by first byte; None when it is not one."""
    m = _BOUNDARY.search(content_type)
    if m is None or not content_type.lower().startswith("multipart/byteranges"):
        return None
    delimiter = b"--" + m.group(1).encode("latin-1")
    parts: dict[int, bytes] = {}
    pos = body.find(delimiter)
    while pos >= 0:
        pos += len(delimiter)
        if body[pos : pos + 2] == b"--":  # the closing delimiter
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        found = _PART_RANGE.search(body, pos, head_end) if head_end >= 0 else None
        if found is None:
            return None
        first, last = int(found.group(1)), int(found.group(2))
        data = body[head_end + 4 : head_end + 5 + last - first]
        if len(data) != last - first + 1:
            return None
        parts[first] = data
        pos = body.find(delimiter, head_end + 4 + len(data))
    return None  # no closing delimiter: cut short


def _covering(parts: Mapping[int, bytes], start: int, end: int) -> bytes | None:
    """Bytes ``start..end-1`` from the part holding them all, if one does."""
    for first, data in parts.items():
        if first <= start and end <= first + len(data):
            return data[start - first : end - first]
    return None


def _total_size(response: http.client.HTTPResponse) -> int | None:
    """The file size a 206 or 416 answer gives (``Content-Range: bytes a-b/N`` or ``*/N``)."""
    value = response.getheader("Content-Range") or ""
    total = value.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


class _ProcessWide:
    """Stands in for one of rasterio's context variables: the same value in every thread and context."""

    def __init__(self, name: str, value: Any) -> None:
        self.name, self.value = name, value

    def get(self, default: Any = None) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value


def _share_registry() -> None:
    """Make rasterio's opener registry one per process instead of one per context.

    rasterio 1.4 keeps registered openers and open files in context variables (and
    reads them with ``get({})``): a thread that does not share the registering context
    (every request's, rio-tiler's reader threads, the dataset pool closing a dataset another
    request opened) finds no opener and cannot close the file. Both are replaced by one
    process-wide dict each (the callbacks that use them run under the GIL).
    """
    for name in ("_OPENER_REGISTRY", "_OPEN_FILE_EXIT_STACKS"):
        var = getattr(_vsiopener, name)
        if not isinstance(var, _ProcessWide):
            setattr(_vsiopener, name, _ProcessWide(name, var.get({})))


#: rasterio has the private internals used here (rasterio 1.4's ``_vsiopener``); else the opener is off
SUPPORTED = MultiByteRangeResourceContainer is not None and all(
    hasattr(_vsiopener, name)
    for name in ("_OPENER_REGISTRY", "_OPEN_FILE_EXIT_STACKS", "_opener_registration")
)
if SUPPORTED:
    _share_registry()


class KnownSizeOpener:
    """How to read one remote file whose size and header size are known (its GDAL path: `vsi_path`).

    ``budget`` and ``label`` are those of the reader using the dataset now (a pooled
    dataset serves one request at a time); ``error`` the failure the last read met.
    """

    def __init__(
        self,
        href: str,
        size: int,
        header_size: int | None,
        *,
        headers: Mapping[str, str] | None = None,
        signer: Callable[..., str] | None = None,
        budget: Budget | None = None,
    ) -> None:
        """Open ``href`` (unsigned) of ``size`` bytes; ``signer`` signs it, ``headers`` go with each GET."""
        self.href = href
        self.key = f"{href}#{size}"  # a file replaced by one of another size never mixes chunks
        self.size_ = size
        self.prefetch = min(size, max(header_size or 0, CONFIG.ingested_bytes))
        self.headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self.signer = signer
        self.budget = budget
        self.error: BaseException | None = None
        parts = urlsplit(href)
        self.host = parts.netloc.rsplit("@", 1)[-1] or "unknown"
        self.origin = f"{parts.scheme}://{self.host}"
        self._url: str | None = None
        self._next_chunk = -1  # the chunk after the last sequential GET, and its length in chunks
        self._blocks = 1
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the file (`_Router` serves it to GDAL)

    def _is_it(self, path: str) -> bool:
        return path == self.href or path.rstrip("/") == self.href

    def open(self, path: str, mode: str = "rb", **kwds: Any) -> RangeFile:
        """A file object reading ``path`` (only the opener's own file exists)."""
        if not self._is_it(path) or "w" in mode or "+" in mode:
            raise FileNotFoundError(path)
        return RangeFile(self)

    # ---------------------------------------------------------------- reading

    def url(self, refresh: bool = False) -> str:
        """The href to GET: signed (again, with ``refresh``) when a signer covers it."""
        with self._lock:
            if self.signer is None:
                return self.href
            if self._url is None or refresh:
                self._url = self.signer(self.href, refresh=refresh)
            return self._url

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start..end-1``, from the chunk cache and at most one GET per run of missing chunks."""
        end = min(end, self.size_)
        if start >= end:
            return b""
        lo, hi = start, end
        if lo < self.prefetch:  # the header is fetched whole, at once (as GDAL_INGESTED_BYTES_AT_OPEN)
            lo, hi = 0, max(hi, self.prefetch)
        first, last = lo // CHUNK, (hi - 1) // CHUNK
        have = CHUNKS.get(self.key, first, last)
        runs = _missing_runs(first, last, have)
        if runs and lo >= self.prefetch:
            runs[0] = self._read_ahead(*runs[0])
        first, last = start // CHUNK, (end - 1) // CHUNK
        for (a, b), data in zip(runs, self._fetch_runs(runs), strict=True) if runs else ():
            if a <= first and last <= b:  # all of it in one GET: one copy
                return data[start - a * CHUNK : end - a * CHUNK]
            for i in range(max(a, first), min(b, last) + 1):
                have[i] = data[(i - a) * CHUNK : (i - a + 1) * CHUNK]
        if first == last:
            return have[first][start - first * CHUNK : end - first * CHUNK]
        buf = b"".join(have[i] for i in range(first, last + 1))
        return buf[start - first * CHUNK : end - first * CHUNK]

    def _read_ahead(self, a: int, b: int) -> tuple[int, int]:
        """The chunks to GET for a read missing ``a..b``: more when reads go on sequentially (as /vsicurl/).

        A read starting where the previous GET ended asks twice the chunks of that GET (doubling
        up to 256, 4 MiB, or what the read needs); a read elsewhere starts again from one chunk.
        The run stops before a chunk already held.
        """
        if a == self._next_chunk:
            if self._blocks < 128:
                self._blocks *= 2
        else:
            self._blocks = 1
        n = max(self._blocks, b - a + 1)
        last_chunk = (self.size_ - 1) // CHUNK
        end = min(a + n - 1, last_chunk)
        if end > b:
            held = CHUNKS.get(self.key, b + 1, end)
            for i in range(b + 1, end + 1):
                if i in held:
                    end = i - 1
                    break
        self._next_chunk, self._blocks = end + 1, end - a + 1
        return a, end

    def _fetch_runs(self, runs: list[tuple[int, int]]) -> list[bytes]:
        """The chunk runs ``(a, b)``: one GET for one run, else one multi-range GET (or parallel GETs)."""
        if len(runs) == 1:
            return [self._fetch_chunks(*runs[0])]
        if CONFIG.multirange and self.origin not in NO_MULTIRANGE:
            spans = [(a * CHUNK, min((b + 1) * CHUNK, self.size_)) for a, b in runs]
            datas = self.get_multi(spans)
            if datas is not None:
                for (a, _), data in zip(runs, datas, strict=True):
                    CHUNKS.put(self.key, a, data)
                return datas
        return list(_parallel.map(lambda r: self._fetch_chunks(*r), runs))

    def _fetch_chunks(self, a: int, b: int) -> bytes:
        start, end = a * CHUNK, min((b + 1) * CHUNK, self.size_)
        data = self.get(start, end)
        CHUNKS.put(self.key, a, data)
        return data

    def get(self, start: int, end: int) -> bytes:
        """One ranged GET of ``start..end-1``: retried, re-signed once, cut by timeouts and the deadline."""
        attempt = 0
        resigned = False
        url = self.url()
        while True:
            timeout = self._timeout()
            try:
                code, data = self._send(
                    url, f"bytes={start}-{end - 1}", timeout, lambda c, r, d: self._body(c, r, end, d)
                )
            except TimeoutError as e:
                error: OriginError = OriginError(f"Operation timed out after {timeout:g} s")
                code, data, cause = None, b"", e
            except (OSError, http.client.HTTPException) as e:
                error = OriginError(f"Connection failed: {type(e).__name__}")
                code, data, cause = None, b"", e
            else:
                if code == 206 and len(data) == end - start:
                    return data
                if code == 200 and len(data) >= end:
                    return data[start:end]  # a host that ignores Range: the whole file came
                if code in (200, 206):
                    error, cause = OriginError("Read failed: the transfer was cut short"), None
                else:
                    error, cause = OriginError(f"HTTP response code: {code}"), None
            if code in (401, 403) and self.signer is not None and not resigned:
                resigned = True
                logger.info("upstream refused a signed href while reading; signing it again")
                url = self.url(refresh=True)
                continue
            retriable = code in CONFIG.retry_codes or (code is None and cause is not None)
            if not retriable or attempt >= CONFIG.max_retry:
                raise error from cause
            delay = CONFIG.retry_delay * 2**attempt
            if self.budget is not None and self.budget.remaining() < delay:
                raise error from cause
            attempt += 1
            time.sleep(delay)

    def _timeout(self) -> float:
        if self.budget is None:
            return CONFIG.timeout
        self.budget.check(f"reading {self.href.rsplit('/', 1)[-1].split('?', 1)[0]}")
        return max(0.05, min(CONFIG.timeout, self.budget.remaining()))

    def get_multi(self, spans: list[tuple[int, int]]) -> list[bytes] | None:
        """The byte ranges ``spans`` (``start, end``) in one multi-range GET; None when that did not work.

        One attempt: the caller then GETs each range (with retries, re-signing and the errors
        they give). A host that answers a multi-range request with anything but those ranges
        (the whole file: the connection is dropped before its body; the first range; a 416)
        goes into `NO_MULTIRANGE`.
        """
        value = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in spans)
        try:
            timeout = self._timeout()
            code, parts = self._send(
                self.url(), value, timeout, lambda c, r, d: self._multi_body(c, r, spans, d)
            )
        except (OriginError, OSError, http.client.HTTPException) as e:
            logger.debug("multi-range GET of %s failed (%s): one GET per range", self.host, type(e).__name__)
            return None
        if code == 206 and parts is not None:
            datas = [_covering(parts, a, b) for a, b in spans]
            if all(d is not None for d in datas):
                return datas  # type: ignore[return-value]
        if code in (200, 206, 416):
            if len(NO_MULTIRANGE) > 10000:
                NO_MULTIRANGE.clear()
            NO_MULTIRANGE.add(self.origin)
            logger.info("%s does not serve multi-range GETs (%s): one GET per range", self.host, code)
        return None

    def _multi_body(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        spans: list[tuple[int, int]],
        deadline: float,
    ) -> tuple[int, dict[int, bytes] | None]:
        """Status and parts of a multi-range answer (a single 206 part counts as one part)."""
        code = response.status
        if code != 206:
            conn.close()  # a whole file or an error: not read
            return code, None
        limit = sum(b - a for a, b in spans) + 512 * len(spans) + 4096
        if response.length is not None and response.length > limit:
            conn.close()
            return code, None
        content_type = response.getheader("Content-Type") or ""
        single = response.getheader("Content-Range")
        code, body = self._body(conn, response, limit, deadline, whole=True)
        if single:  # one part: the server merged the ranges, or sent the first only
            m = re.match(r"\s*bytes\s+(\d+)-(\d+)/", single)
            if m is None or len(body) != int(m.group(2)) - int(m.group(1)) + 1:
                return code, None
            return code, {int(m.group(1)): body}
        return code, _byteranges(content_type, body)

    def _send(
        self,
        url: str,
        ranges: str,
        timeout: float,
        reader: Callable[[http.client.HTTPConnection, http.client.HTTPResponse, float], Any],
    ) -> Any:
        """GET ``ranges`` on this thread's connection to the host (a new one if the kept one was closed).

        ``reader(connection, response, deadline)`` reads the answer.
        """
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {**self.headers, "Range": ranges}
        if "@" in parts.netloc and parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        deadline = time.monotonic() + timeout
        for fresh in (False, True):
            conn = _CONNECTIONS.get(parts.scheme, parts.netloc, fresh)
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.timeout = min(CONFIG.connect_timeout, timeout)
                    conn.connect()
                conn.sock.settimeout(timeout)
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest) as e:
                conn.close()
                if reused and not fresh:  # the host closed the kept connection: once more on a new one
                    continue
                ORIGIN_REQUESTS.labels(host=self.host, method="GET").inc()
                raise e
            except BaseException:
                conn.close()
                ORIGIN_REQUESTS.labels(host=self.host, method="GET").inc()
                raise
            ORIGIN_REQUESTS.labels(host=self.host, method="GET").inc()
            return reader(conn, response, deadline)
        raise AssertionError("unreachable")

    def _body(
        self,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        end: int,
        deadline: float,
        whole: bool = False,
    ) -> tuple[int, bytes]:
        """Status and body of ``response`` (none unless 200/206); the connection is kept when it can be.

        A 200 is read up to ``end`` (a host that ignored Range), a 206 whole, or up to ``end``
        bytes with ``whole`` (a multi-range answer, bounded).
        """
        code = response.status
        received = 0
        try:
            total = _total_size(response) if code in (206, 416) else None
            if code == 200 and response.length is not None:
                total = response.length
            if total is not None and total != self.size_:
                if len(WRONG_SIZES) > 10000:
                    WRONG_SIZES.clear()
                WRONG_SIZES.add((self.href, self.size_))
                raise SizeMismatch(
                    f"the file on the storage has {total} bytes, its STAC item says {self.size_} (file:size)"
                )
            if code not in (200, 206):
                response.read(65536)
                return code, b""
            limit = None if code == 206 and not whole else end  # a whole file: stop once the range is in
            chunks = []
            while limit is None or received < limit:
                part = response.read(1 << 20 if limit is None else min(1 << 20, limit - received))
                if not part:
                    break
                chunks.append(part)
                received += len(part)
                if time.monotonic() > deadline:
                    raise TimeoutError("transfer too slow")
            return code, b"".join(chunks)
        except BaseException:
            conn.close()
            raise
        finally:
            if received:
                ORIGIN_BYTES.labels(host=self.host).inc(received)
            if not response.isclosed():
                conn.close()  # not read to its end: the connection cannot serve another request
            elif response.will_close:
                conn.close()

    def get_ranges(self, offsets: list[int], sizes: list[int]) -> list[bytes]:
        """The ranges ``offsets[i]..+sizes[i]``: touching ones merged, each merged range read via the cache.

        One range is a plain `read` (with its read-ahead), as /vsicurl/ does.
        """
        if len(offsets) == 1:
            return [self.read(offsets[0], offsets[0] + sizes[0])]
        order = sorted(range(len(offsets)), key=lambda i: offsets[i])
        spans: list[list[int]] = []
        for i in order:
            o, s = offsets[i], sizes[i]
            if spans and o <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], o + s)
            else:
                spans.append([o, o + s])
        # the missing chunks of all spans, fetched in parallel, then each span from the cache
        runs: list[tuple[int, int]] = []
        for a, b in spans:
            lo, hi = (0, max(b, self.prefetch)) if a < self.prefetch else (a, b)
            first, last = lo // CHUNK, (min(hi, self.size_) - 1) // CHUNK
            for run in _missing_runs(first, last, CHUNKS.get(self.key, first, last)):
                if runs and run[0] <= runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], max(runs[-1][1], run[1]))
                else:
                    runs.append(run)
        fetched = dict(zip(runs, self._fetch_runs(runs), strict=True)) if runs else {}
        datas = {}
        for a, b in spans:
            datas[a] = self._span(a, b, fetched)
        out = []
        for o, s in zip(offsets, sizes, strict=True):
            a = max(x for x in datas if x <= o)
            out.append(datas[a][o - a : o - a + s])
        return out

    def _span(self, a: int, b: int, fetched: dict[tuple[int, int], bytes]) -> bytes:
        """Bytes ``a..b-1`` from the chunk cache, or the runs just fetched if the cache let them go."""
        b = min(b, self.size_)
        first, last = a // CHUNK, (b - 1) // CHUNK
        have = CHUNKS.get(self.key, first, last)
        for (r0, r1), data in fetched.items():
            for i in range(max(r0, first), min(r1, last) + 1):
                have.setdefault(i, data[(i - r0) * CHUNK : (i - r0 + 1) * CHUNK])
        if len(have) < last - first + 1:  # evicted meanwhile (a tiny cache): read again
            return self.read(a, b)
        buf = b"".join(have[i] for i in range(first, last + 1))
        return buf[a - first * CHUNK : b - first * CHUNK]


class _Router:
    """The one opener rasterio registers (`vsi_path`): it hands each path to its file's opener.

    rasterio's ``rasterio.open(href, opener=...)`` installs a GDAL file system handler at
    every open and removes it at every close; GDAL's handler table has no lock, and other
    threads look handlers up at every open, so that is not safe in a threaded server. One
    handler is installed once instead, and paths name their opener:
    ``/vsiriopener_<id>/<token>/<href>``. Openers are held weakly: one lives as long as its
    dataset (`tiler.upstream` keeps it with the dataset) and its open files.
    """

    def __init__(self) -> None:
        self.files: weakref.WeakValueDictionary[str, KnownSizeOpener] = weakref.WeakValueDictionary()
        self.prefix: str | None = None
        self._registration: Any = None
        self._lock = threading.Lock()

    def install(self) -> str:
        """The handler's path prefix (installed on first use)."""
        with self._lock:
            if self.prefix is None:
                self._registration = _vsiopener._opener_registration("tiler/opener", self)
                path = self._registration.__enter__()  # never left: the handler stays for the process
                self.prefix = "/" + path.split("/")[1] + "/"
            return self.prefix

    def _get(self, path: str) -> tuple[KnownSizeOpener, str]:
        token, _, href = path.partition("/")
        found = self.files.get(token)
        if found is None or not found._is_it(href):
            raise FileNotFoundError(path)
        return found, href

    def open(self, path: str, mode: str = "rb", **kwds: Any) -> RangeFile:
        """A file object of the path's opener."""
        found, href = self._get(path)
        return found.open(href, mode)

    def isfile(self, path: str) -> bool:
        """True for a registered file."""
        try:
            self._get(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: str) -> bool:
        """No directories."""
        return False

    def ls(self, path: str) -> list[str]:
        """No listings."""
        return []

    def mtime(self, path: str) -> int:
        """Unknown: 0."""
        return 0

    def rm(self, path: str) -> None:
        """Read-only."""
        raise PermissionError(path)

    def size(self, path: str) -> int:
        """The file's size (``file:size``)."""
        found, _ = self._get(path)
        return found.size_


if MultiByteRangeResourceContainer is not None:
    MultiByteRangeResourceContainer.register(_Router)
_ROUTER = _Router()


def vsi_path(op: KnownSizeOpener) -> str:
    """The GDAL path that reads ``op``'s file through it (keep ``op`` referenced while in use)."""
    prefix = _ROUTER.install()
    token = uuid.uuid4().hex
    _ROUTER.files[token] = op
    return f"{prefix}{token}/{op.href}"


def _missing_runs(first: int, last: int, have: Mapping[int, bytes]) -> list[tuple[int, int]]:
    """Runs ``(a, b)`` (inclusive) of consecutive chunk indexes in ``first..last`` not in ``have``."""
    runs: list[tuple[int, int]] = []
    for i in range(first, last + 1):
        if i in have:
            continue
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class RangeFile:
    """The file object GDAL reads through (one per GDAL handle; position of its own)."""

    def __init__(self, opener: KnownSizeOpener) -> None:
        """Read ``opener``'s file from its start."""
        self.opener = opener
        self.pos = 0
        self.closed = False

    def __enter__(self) -> RangeFile:
        """Itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to release (the HTTP client is shared)."""
        self.closed = True

    def close(self) -> None:
        """Nothing to release."""
        self.closed = True

    def seekable(self) -> bool:
        """Yes."""
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the position (``whence`` as `io`)."""
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.opener.size_ + offset
        return self.pos

    def tell(self) -> int:
        """The position."""
        return self.pos

    def read(self, n: int = -1) -> bytes:
        """``n`` bytes from the position (all when negative); short (empty) after a failure."""
        size = self.opener.size_
        end = size if n is None or n < 0 else min(size, self.pos + n)
        try:
            data = self.opener.read(self.pos, end)
        except BaseException as e:  # noqa: BLE001 - rasterio swallows it: recorded for the reader
            self.opener.error = e
            return b""
        self.pos += len(data)
        return data

    def get_byte_ranges(self, offsets: list[int], sizes: list[int]) -> list[bytes]:
        """GDAL's multi-range read (the blocks of a window).

        Raising here would leave an exception set inside GDAL's call; after a failure the
        ranges come back zero-filled instead, the failure is recorded and the reader raises
        it when GDAL returns (nothing read with it is kept).
        """
        try:
            return self.opener.get_ranges(offsets, sizes)
        except BaseException as e:  # noqa: BLE001 - see above
            self.opener.error = e
            return [bytes(s) for s in sizes]


def take_error(opener: KnownSizeOpener | None) -> BaseException | None:
    """The failure ``opener``'s reads recorded since the last call (then forgotten), if any."""
    if opener is None or opener.error is None:
        return None
    error, opener.error = opener.error, None
    return error
