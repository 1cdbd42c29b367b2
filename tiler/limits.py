"""Caps on what a caller may ask for (``TILER_LIMIT_*``), checked before any read.

Three pieces, all configured by `tiler.settings.LimitSettings`:

* `limits_dependency`: an application-wide dependency that runs before every other
  one (access control, pgstac lookups, readers). It reads the sizes, expressions and
  filters of the request by name and refuses anything over a cap with a 400
  (`tiler.errors.LimitExceeded`) naming the parameter and the cap. Titiler takes some
  of these as plain endpoint arguments (``tilesize``, ``{width}x{height}``), so one
  check by name covers every route, including search registration and thumbnails.
* `BodyLimitMiddleware`: request bodies over ``max_body_bytes`` get a 413 before they
  are read whole; JSON bodies nested deeper than ``max_body_depth`` a 400 before they
  are parsed.
* titiler dependency subclasses: `part_params` gives bbox/feature exports without a
  size a bounded ``max_size``; `mosaic_params` clamps pgstac's ``scan_limit``,
  ``items_limit`` and ``time_limit``.
"""

# no `from __future__ import annotations`: FastAPI reads the annotations of the
# dataclasses built inside functions below at runtime
import json
import math
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from cql2 import Expr
from fastapi import HTTPException, Query
from rasterio.features import is_valid_geom
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from titiler.core.dependencies import PartFeatureParams, PreviewParams
from titiler.pgstac.backend import pgstac_config

from tiler.dependencies import MosaicAssetsParams, runs_inline
from tiler.errors import InvalidFilter, LimitExceeded
from tiler.operations import PUBLIC, Operation, declared
from tiler.settings import LimitSettings

#: operands of a band-math expression: names (bands, functions) and numbers
_OPERAND = re.compile(r"[A-Za-z_][A-Za-z0-9_:.]*|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")
#: coordinates beyond this (in any CRS) cannot be a place on Earth
MAX_COORDINATE = 1e9
_PROPERTY = re.compile(r"[A-Za-z_][A-Za-z0-9_:.\-]{0,127}")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def _over(name: str, value: Any, cap: Any, measure: str = "") -> LimitExceeded:
    what = f" ({measure})" if measure else ""
    if isinstance(cap, float) and cap.is_integer():
        cap = int(cap)
    return LimitExceeded(f"`{name}` is over the server's limit{what}: {value} > {cap}")


def _number(value: str | None) -> float | None:
    """``value`` as a number, or None when absent or not a number (FastAPI reports those)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _cap(name: str, value: str | None, cap: float) -> float | None:
    number = _number(value)
    if number is not None and number > cap:
        raise _over(name, value, cap)
    return number


def json_depth(obj: Any) -> int:
    """Nesting depth of a JSON value (objects and arrays), without recursion."""
    depth = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in value)
    return depth


def longest_list(obj: Any) -> int:
    """Length of the longest array anywhere in a JSON value."""
    longest = 0
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            longest = max(longest, len(value))
            stack.extend(value)
    return longest


def raw_json_depth(body: bytes) -> int:
    """Nesting depth of a JSON text, counted on its brackets outside strings (no parsing)."""
    depth = longest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        if m.group() in (b"[", b"{"):
            depth += 1
            longest = max(longest, depth)
        else:
            depth -= 1
    return longest


def check_expression(limits: LimitSettings, expression: str, name: str = "expression") -> None:
    """Refuse a band-math expression over the length or operand caps."""
    if len(expression) > limits.max_expression_length:
        raise _over(name, len(expression), limits.max_expression_length, "characters")
    terms = len(_OPERAND.findall(expression))
    if terms > limits.max_expression_terms:
        raise _over(name, terms, limits.max_expression_terms, "operands")
    blocks = [b for b in expression.split(";") if b.strip()]
    if not blocks:
        raise LimitExceeded(f"`{name}` has no band expression")
    if len(blocks) > limits.max_bands:
        raise _over(name, len(blocks), limits.max_bands, "output bands")


def property_names(value: Any) -> Iterator[str]:
    """Every ``{"property": name}`` of a CQL2-JSON expression."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if isinstance(name := v.get("property"), str) and len(v) == 1:
                yield name
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def check_json(limits: LimitSettings, value: Any, name: str) -> None:
    """Refuse a parsed CQL2-JSON filter or query over the size, depth or list caps.

    Property names must look like STAC field names (letters, digits, ``_ : . -``):
    quotes, semicolons or comment markers in a name are refused, not sent to pgstac.
    """
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > limits.max_filter_bytes:
        raise _over(name, size, limits.max_filter_bytes, "bytes")
    depth = json_depth(value)
    if depth > limits.max_filter_depth:
        raise _over(name, depth, limits.max_filter_depth, "nesting depth")
    items = longest_list(value)
    if items > limits.max_filter_items:
        raise _over(name, items, limits.max_filter_items, "list length")
    for prop in property_names(value):
        if not _PROPERTY.fullmatch(prop):
            raise InvalidFilter(
                f"`{name}` has an invalid property name {prop[:64]!r}: "
                "letters, digits, `_`, `:`, `.` and `-` only, starting with a letter or `_`"
            )


def check_filter(limits: LimitSettings, value: Any, lang: str | None, name: str = "filter") -> None:
    """Refuse a CQL2 filter (text or JSON, parsed or not) over the caps.

    Text that does not parse is left to titiler's own validation (a 4xx).
    """
    if isinstance(value, str):
        if len(value.encode()) > limits.max_filter_bytes:
            raise _over(name, len(value.encode()), limits.max_filter_bytes, "bytes")
        try:
            value = json.loads(value) if lang == "cql2-json" else Expr(value).to_json()
        except Exception:  # noqa: BLE001 - malformed: titiler validates and answers 4xx
            return
    if value is not None:
        check_json(limits, value, name)


def _check_bands(limits: LimitSettings, q: Any) -> None:
    bidx = q.getlist("bidx")
    if len(bidx) > limits.max_bands:
        raise _over("bidx", len(bidx), limits.max_bands, "bands")
    for v in bidx:
        _at_least_one("bidx", _number(v))
    assets = q.getlist("assets")
    if len(assets) > limits.max_bands:
        raise _over("assets", len(assets), limits.max_bands, "assets")
    bands = 0
    for asset in assets:
        if not asset.split("|", 1)[0].strip():
            raise LimitExceeded("`assets` has an empty asset name")
        for option in asset.split("|")[1:]:
            key, _, value = option.partition("=")
            if key in ("bidx", "bands"):
                bands += len(value.split(","))
            elif key == "expression":
                check_expression(limits, value, "assets")
    if bands > limits.max_bands:
        raise _over("assets", bands, limits.max_bands, "bands")


def _at_least_one(name: str, value: float | None) -> None:
    if value is not None and value < 1:
        raise LimitExceeded(f"`{name}` must be at least 1 (got {value:g})")


def _check_coordinates(p: dict, q: Any) -> None:
    """``/bbox/{minx},{miny},{maxx},{maxy}`` (a non-empty box) and ``/point/{lon},{lat}``.

    Longitudes and latitudes unless ``coord_crs`` is given; then finite and under
    `MAX_COORDINATE` (PROJ fails on anything beyond a place on Earth).
    """
    geographic = not q.get("coord_crs")
    for names, what in ((("minx", "miny", "maxx", "maxy"), "bbox"), (("lon", "lat"), "point")):
        coords = [_number(p.get(k)) for k in names]
        if any(c is None for c in coords):
            continue  # absent or not numbers: FastAPI answers
        xs, ys = coords[0::2], coords[1::2]
        if geographic:
            ok = all(-180 <= x <= 180 for x in xs) and all(-90 <= y <= 90 for y in ys)
        else:
            ok = all(math.isfinite(c) and abs(c) <= MAX_COORDINATE for c in coords)  # type: ignore[arg-type]
        if not ok:
            unit = "longitudes and latitudes" if geographic else f"finite and within {MAX_COORDINATE:g}"
            raise LimitExceeded(f"`{what}` coordinates must be {unit}")
        if what == "bbox" and not (coords[0] < coords[2] and coords[1] < coords[3]):  # type: ignore[operator]
            raise LimitExceeded("`bbox` must have minx < maxx and miny < maxy")


def _check_sizes(limits: LimitSettings, op: Operation, q: Any, p: dict) -> None:
    z = _cap("z", p.get("z"), limits.max_zoom)
    if z is not None and z < 0:
        raise LimitExceeded(f"`z` must not be negative (got {p['z']})")
    for name in ("minzoom", "maxzoom"):
        zoom = _cap(name, q.get(name), limits.max_zoom)
        if zoom is not None and zoom < 0:
            raise LimitExceeded(f"`{name}` must not be negative (got {q[name]})")
    for value in q.getlist("zooms"):  # `tileMatrixSetId::minzoom,maxzoom`
        for zoom in value.rpartition("::")[2].split(","):
            _cap("zooms", zoom, limits.max_zoom)
    _check_coordinates(p, q)
    _at_least_one("tilesize", _number(q.get("tilesize")))
    for name, cap in (
        ("tilesize", limits.max_tilesize),
        ("buffer", limits.max_buffer),
        ("padding", limits.max_padding),
    ):
        _cap(name, q.get(name), cap)
    if op.sizes == "statistics":
        side = limits.max_statistics_size
    elif op.sizes == "part":
        side = limits.max_part_size
    else:
        side = limits.max_preview_size
    sizes = {}
    for name in ("width", "height", "max_size"):
        sizes[name] = _cap(name, p.get(name) or q.get(name), side)
        _at_least_one(name, sizes[name])
    if op.sizes == "thumbnail":
        _cap("size", q.get("size"), limits.max_preview_size)
    width, height = sizes["width"], sizes["height"]
    if op.sizes == "part" and width and height and width * height > limits.max_part_pixels:
        raise _over("width` x `height", int(width * height), limits.max_part_pixels, "pixels")


def _check_statistics(limits: LimitSettings, q: Any) -> None:
    bins = q.get("histogram_bins")
    if bins:
        edges = bins.split(",")
        count = _number(edges[0]) if len(edges) == 1 else len(edges) - 1
        if count is not None and count > limits.max_histogram_bins:
            raise _over("histogram_bins", int(count), limits.max_histogram_bins, "bins")
    for name in ("p", "c"):
        values = q.getlist(name)
        if len(values) > limits.max_histogram_bins:
            raise _over(name, len(values), limits.max_histogram_bins, "values")
    for v in q.getlist("p"):
        if (n := _number(v)) is not None and not 0 <= n <= 100:
            raise LimitExceeded(f"`p` percentiles must be between 0 and 100 (got {v})")


def _check_search_query(limits: LimitSettings, q: Any) -> None:
    """Collection mosaics take a search in the query string: ``filter``, ``query``, ``ids``."""
    if (f := q.get("filter")) is not None:
        check_filter(limits, f, q.get("filter-lang", "cql2-text"))
    if (query := q.get("query")) is not None:
        check_filter(limits, query, "cql2-json", "query")
    if (ids := q.get("ids")) is not None and len(ids.split(",")) > limits.max_filter_items:
        raise _over("ids", len(ids.split(",")), limits.max_filter_items, "ids")


#: how rio-tiler's single-file reader finds band names in an expression (``b1``, ``B2``)
_FILE_BAND = re.compile(r"\bb([0-9A-Z]+)\b", re.IGNORECASE)


def check_file_bands(expression: str) -> None:
    """On a single file (an asset, ``/cog``), every ``b<name>`` of an expression must be ``b<number>``."""
    for name in _FILE_BAND.findall(expression):
        if not name.isdigit():
            raise HTTPException(400, f"`expression` names band `b{name}`: bands of a file are b1, b2, ...")


def check_search_body(limits: LimitSettings, body: Any) -> None:
    """Refuse a search registration body whose filter, query, lists or geometry are over the caps."""
    if not isinstance(body, dict):
        return  # FastAPI answers 422
    if body.get("bbox") is not None and body.get("intersects") is not None:
        # titiler-pgstac refuses the pair, but its validator raises KeyError (a 500) when the bbox is invalid
        raise HTTPException(400, "Give `bbox` or `intersects`, not both")
    if isinstance(body.get("intersects"), dict):
        check_geojson({"type": "Feature", "geometry": body["intersects"]})
    if "filter" in body:
        check_filter(limits, body["filter"], body.get("filter-lang") or "cql2-json")
    if "query" in body:
        check_filter(limits, body["query"], "cql2-json", "query")
    items = longest_list(body)
    if items > limits.max_filter_items:
        raise _over("body", items, limits.max_filter_items, "list length")


def _numbers(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        else:
            yield v


def _check_geometry_shape(geometry: Any) -> None:
    """Refuse (400) what rio-tiler refuses with a 500: an empty or degenerate geometry.

    The same test rio-tiler makes before reading a feature (rasterio's ``is_valid_geom``:
    a GeometryCollection with geometries, a Polygon with a ring of 4 positions, ...). A body
    too malformed for the test is left to FastAPI's validation (422).
    """
    try:
        valid = is_valid_geom(geometry)
    except (TypeError, KeyError, IndexError, AttributeError):
        return
    if not valid:
        raise HTTPException(
            400,
            "The GeoJSON body's geometry is empty or incomplete: a GeometryCollection needs geometries, "
            "a Polygon a ring of at least 4 positions, a LineString 2 positions",
        )


def check_geojson(body: Any) -> None:
    """A GeoJSON Feature (or FeatureCollection) body: geometries present, coordinates finite and plausible."""
    if not isinstance(body, dict):
        return  # FastAPI answers 422
    features = body.get("features") if body.get("type") == "FeatureCollection" else [body]
    if not isinstance(features, list):
        return
    for f in features:
        if not isinstance(f, dict):
            continue
        geometry = f.get("geometry")
        if geometry is None:
            raise HTTPException(400, "The GeoJSON body has a Feature without `geometry`")
        _check_geometry_shape(geometry)
        geometries = [geometry]
        if f.get("bbox") is not None and len(f["bbox"]) != 4:
            raise HTTPException(400, "The GeoJSON body's `bbox` must have 4 numbers")
        while geometries:
            g = geometries.pop()
            if not isinstance(g, dict):
                continue
            if g.get("bbox") is not None and len(g["bbox"]) != 4:
                raise HTTPException(400, "The GeoJSON body's `bbox` must have 4 numbers")
            geometries.extend(g.get("geometries") or [])
            for c in _numbers(g.get("coordinates")):
                if isinstance(c, bool) or not isinstance(c, int | float):
                    continue  # FastAPI answers 422
                if abs(c) > MAX_COORDINATE or (isinstance(c, float) and not math.isfinite(c)):
                    raise HTTPException(
                        400,
                        f"The GeoJSON body has a coordinate that is not finite or over {MAX_COORDINATE:g}",
                    )


def limits_dependency(limits: LimitSettings) -> Callable[[Request], Awaitable[None]]:
    """Application-wide dependency refusing (400) any request over a cap of ``limits``.

    Runs first, so nothing is looked up in pgstac and no pixel is read for a refused
    request. Values that are not numbers are left to FastAPI's validation (422).
    """

    async def enforce_limits(request: Request) -> None:
        op = declared(request.scope.get("route")) or PUBLIC
        q, p = request.query_params, request.path_params
        _check_sizes(limits, op, q, p)
        if (expression := q.get("expression")) is not None:
            check_expression(limits, expression)
            if "asset_id" in p or op.resource == "cog":
                check_file_bands(expression)
        _check_bands(limits, q)
        _check_statistics(limits, q)
        _check_search_query(limits, q)
        if request.method != "POST":
            return
        try:
            body = await request.json()  # already read and parsed by FastAPI
        except Exception:  # noqa: BLE001 - FastAPI reports malformed bodies
            return
        if op.resource == "register":
            check_search_body(limits, body)
        elif op.sizes in ("part", "statistics"):
            check_geojson(body)

    return enforce_limits


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413) or JSON nested over ``max_depth`` (400).

    The body is buffered (at most ``max_bytes``) and handed to the application
    unchanged; a declared ``Content-Length`` over the cap is refused without reading.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int):
        """Wrap ``app``."""
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the body, then run the application with it."""
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        too_large = f"Request body is over the server's limit of {self.max_bytes} bytes"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, too_large)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, too_large)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if b"json" in headers.get(b"content-type", b""):
            depth = raw_json_depth(body)
            if depth > self.max_depth:
                await self._refuse(
                    scope,
                    receive,
                    send,
                    400,
                    f"Request body is nested {depth} levels deep, over the server's limit of {self.max_depth}",
                )
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _limited(value: int | None, default: int, cap: int) -> int:
    return min(value if value is not None else default, cap)


def mosaic_params(limits: LimitSettings) -> type[MosaicAssetsParams]:
    """Mosaic item-search options (titiler-pgstac's) with the limits clamped to the caps."""

    def doc(what: str, cap: int) -> str:
        name = what.split(":")[0]
        return f"{what} (default {min(getattr(pgstac_config, name), cap)}, at most {cap})."

    @dataclass
    class LimitedMosaicParams(MosaicAssetsParams):
        """``scan_limit``, ``items_limit``, ``time_limit``: at least 1, clamped to the server's caps."""

        scan_limit: Annotated[
            int | None,
            Query(
                ge=1,
                description=doc("scan_limit: return as soon as N items are scanned", limits.max_scan_limit),
            ),
        ] = None
        items_limit: Annotated[
            int | None,
            Query(
                ge=1,
                description=doc(
                    "items_limit: return as soon as N items cover a tile", limits.max_items_limit
                ),
            ),
        ] = None
        time_limit: Annotated[
            int | None,
            Query(ge=1, description=doc("time_limit: return after N seconds", limits.max_time_limit)),
        ] = None

        def __post_init__(self) -> None:
            """Clamp (a request for more gets the cap; none given gets pgstac's default, capped)."""
            self.scan_limit = _limited(self.scan_limit, pgstac_config.scan_limit, limits.max_scan_limit)
            self.items_limit = _limited(self.items_limit, pgstac_config.items_limit, limits.max_items_limit)
            self.time_limit = _limited(self.time_limit, pgstac_config.time_limit, limits.max_time_limit)

    return runs_inline(LimitedMosaicParams)


def part_params(limits: LimitSettings) -> type[PartFeatureParams]:
    """bbox/feature size options (titiler's); without any size, ``max_size`` is bounded by the caps."""

    @dataclass
    class LimitedPartParams(PartFeatureParams):
        def __post_init__(self) -> None:
            """Native resolution is the default, up to `LimitSettings.default_part_max_size`."""
            super().__post_init__()
            if not (self.width or self.height or self.max_size):
                self.max_size = limits.default_part_max_size

    return runs_inline(LimitedPartParams)


def preview_params(limits: LimitSettings) -> type[PreviewParams]:
    """Preview/statistics size options (titiler's); the default ``max_size`` stays within the cap."""

    @dataclass
    class LimitedPreviewParams(PreviewParams):
        def __post_init__(self) -> None:
            """Titiler's default (1024) unless the preview cap is smaller (larger values are refused)."""
            super().__post_init__()
            if self.max_size is not None:
                self.max_size = min(self.max_size, limits.max_preview_size)

    return runs_inline(LimitedPreviewParams)
