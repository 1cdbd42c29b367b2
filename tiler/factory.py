"""Factory extensions: endpoints we add to titiler's factories.

``thumbnailExtension`` gives items (and mosaics) a metacatalogue thumbnail: a fixed-size
picture of the footprint in the default preset, read from an overview, with an ETag so
that catalogues revalidate instead of downloading it again.
"""

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import rasterio
from attrs import define
from fastapi import Depends, Query
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rio_tiler.constants import WGS84_CRS
from rio_tiler.models import ImageData
from starlette.requests import Request
from starlette.responses import Response
from titiler.core.errors import TileNotFoundError
from titiler.core.factory import FactoryExtension
from titiler.core.resources.enums import ImageType

from tiler import __version__
from tiler.cache import not_modified, picture_params
from tiler.catalogue import catalogue
from tiler.png import render

WEB_MERCATOR = CRS.from_epsg(3857)

THUMBNAIL_FORMATS = Literal["png", "jpeg", "jpg", "webp"]
MAX_THUMBNAIL_SIZE = 1024


def _etag(*parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f'"{digest[:32]}"'


def _on_white(png: bytes, fmt: ImageType) -> bytes:
    """Composite a rendered PNG (last band alpha) on white and encode it as ``fmt``, without alpha."""
    with MemoryFile(png) as mem, mem.open() as ds:
        data = ds.read().astype("float64")
    top = float(np.iinfo(np.uint16).max if data.max() > 255 else 255)
    alpha = data[-1:] / top
    flat = data[:-1] * alpha + top * (1 - alpha)
    return render(np.rint(flat).astype("uint8" if top == 255 else "uint16"), img_format=fmt.driver)


SizeParam = Annotated[
    int,
    Query(
        ge=16,
        le=MAX_THUMBNAIL_SIZE,
        description="Length of the longer side, in pixels (the aspect ratio is kept).",
    ),
]
BackgroundParam = Annotated[
    Literal["transparent", "white"],
    Query(description="Outside the footprint: transparent (PNG, WebP) or white. JPEG is always white."),
]


@define
class thumbnailExtension(FactoryExtension):  # noqa: N801 - titiler naming
    """``/thumbnail.{format}`` for a STAC item: its footprint, in its own CRS, from an overview."""

    def register(self, factory: Any) -> None:
        """Add the route to ``factory`` (a `MultiBaseTilerFactory` over `tiler.reader.ItemReader`)."""

        @_route(factory, "Thumbnail of the item for catalogues (footprint only, aspect kept, ETag).")
        def thumbnail(
            request: Request,
            format: THUMBNAIL_FORMATS,  # noqa: A002 - titiler naming
            src_path: Annotated[Any, Depends(factory.path_dependency)],
            reader_params: Annotated[Any, Depends(factory.reader_dependency)],
            layer_params: Annotated[Any, Depends(factory.layer_dependency)],
            dataset_params: Annotated[Any, Depends(factory.dataset_dependency)],
            post_process: Annotated[Any, Depends(factory.process_dependency)],
            colormap: Annotated[Any, Depends(factory.colormap_dependency)],
            render_params: Annotated[Any, Depends(factory.render_dependency)],
            env: Annotated[Any, Depends(factory.environment_dependency)],
            size: SizeParam = 256,
            background: BackgroundParam = "transparent",
        ) -> Response:
            item = src_path

            def read() -> ImageData:
                with factory.reader(item, **reader_params.as_dict()) as src:
                    dst_crs = src.crs if src.crs is not None and src.crs != WGS84_CRS else CRS.from_epsg(3857)
                    return src.feature(
                        item.geometry,
                        shape_crs=WGS84_CRS,
                        dst_crs=dst_crs,
                        max_size=size,
                        **layer_params.as_dict(),
                        **dataset_params.as_dict(),
                    )

            version = (
                item.collection_id,
                item.id,
                item.properties.get("updated") or item.properties.get("datetime"),
            )
            picture = _Picture(format, layer_params, render_params, post_process, colormap, background)
            return _thumbnail(factory, request, version, read, env, picture)


#: Items read at most for a mosaic thumbnail (newest first, stop when the extent is covered).
MOSAIC_THUMBNAIL_ITEMS = 50


@define
class mosaicThumbnailExtension(FactoryExtension):  # noqa: N801 - titiler naming
    """``/thumbnail.{format}`` for a collection or search mosaic: its extent, in Web Mercator.

    At most `MOSAIC_THUMBNAIL_ITEMS` items are read (newest on top, stopping once the extent
    is covered), each from the overview matching the thumbnail size. The ETag follows the
    search, the parameters and the newest item: adding an older item does not change it.
    """

    def register(self, factory: Any) -> None:
        """Add the route to ``factory`` (a titiler-pgstac `MosaicTilerFactory`)."""

        @_route(factory, "Thumbnail of the mosaic over its extent (aspect kept, ETag).")
        def thumbnail(
            request: Request,
            format: THUMBNAIL_FORMATS,  # noqa: A002 - titiler naming
            src_path: Annotated[Any, Depends(factory.path_dependency)],
            backend_params: Annotated[Any, Depends(factory.backend_dependency)],
            reader_params: Annotated[Any, Depends(factory.reader_dependency)],
            assets_accessor_params: Annotated[Any, Depends(factory.assets_accessor_dependency)],
            layer_params: Annotated[Any, Depends(factory.layer_dependency)],
            dataset_params: Annotated[Any, Depends(factory.dataset_dependency)],
            pixel_selection: Annotated[Any, Depends(factory.pixel_selection_dependency)],
            post_process: Annotated[Any, Depends(factory.process_dependency)],
            colormap: Annotated[Any, Depends(factory.colormap_dependency)],
            render_params: Annotated[Any, Depends(factory.render_dependency)],
            env: Annotated[Any, Depends(factory.environment_dependency)],
            size: SizeParam = 256,
            background: BackgroundParam = "transparent",
        ) -> Response:
            pool = request.app.state.dbpool

            def read() -> ImageData:
                options = assets_accessor_params.as_dict()
                options["items_limit"] = min(
                    options.get("items_limit") or MOSAIC_THUMBNAIL_ITEMS, MOSAIC_THUMBNAIL_ITEMS
                )
                with factory.backend(
                    src_path,
                    reader=factory.dataset_reader,
                    reader_options=reader_params.as_dict(),
                    **backend_params.as_dict(),
                ) as src_dst:
                    image, _ = src_dst.part(
                        data_extent(pool, src_path, src_dst.bounds),
                        bounds_crs=WGS84_CRS,
                        dst_crs=WEB_MERCATOR,
                        max_size=size,
                        search_options=options,
                        pixel_selection=pixel_selection,
                        **layer_params.as_dict(),
                        **dataset_params.as_dict(),
                    )
                return image

            version = (src_path, catalogue(pool).newest_item(src_path))
            picture = _Picture(format, layer_params, render_params, post_process, colormap, background)
            return _thumbnail(factory, request, version, read, env, picture)


#: Latitudes Web Mercator can show.
MERCATOR_LAT = 85.0511


def data_extent(pool: Any, search_id: str, bounds: Any) -> tuple[float, float, float, float]:
    """The mosaic's bounds cut to its collections' spatial extent (and to Web Mercator).

    A search registered without a bbox has the whole world as bounds: reading a few
    small scenes over the world would warp them onto a planet-sized grid (minutes per
    request). Cut to the data, the thumbnail reads what exists.
    """
    west, south, east, north = (float(v) for v in bounds)
    boxes = []
    cat = catalogue(pool)
    for collection in cat.search_collection_ids(search_id):
        doc = cat.collection(collection) or {}
        bbox = ((doc.get("extent") or {}).get("spatial") or {}).get("bbox") or []
        if bbox and len(bbox[0]) >= 4:
            b = bbox[0]
            boxes.append((b[0], b[1], b[-2], b[-1]) if len(b) == 4 else (b[0], b[1], b[3], b[4]))
    if boxes:
        west = max(west, min(b[0] for b in boxes))
        south = max(south, min(b[1] for b in boxes))
        east = min(east, max(b[2] for b in boxes))
        north = min(north, max(b[3] for b in boxes))
    south, north = max(south, -MERCATOR_LAT), min(north, MERCATOR_LAT)
    if west >= east or south >= north:
        raise TileNotFoundError("The mosaic's bounds do not meet its collections' extent")
    return west, south, east, north


def _route(factory: Any, summary: str) -> Callable:
    """The ``GET /thumbnail.{format}`` route decorator of ``factory`` (both extensions)."""
    return factory.router.get(
        "/thumbnail.{format}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, 304: {}},
        summary=summary,
        operation_id=f"{factory.operation_prefix}getThumbnail",
    )


class _Picture(NamedTuple):
    """What the picture is made of: the parameters both thumbnail routes take."""

    format: str
    layer_params: Any
    render_params: Any
    post_process: Any
    colormap: Any
    background: str


def _thumbnail(
    factory: Any,
    request: Request,
    version: tuple,
    read: Callable[[], ImageData],
    env: dict,
    picture: _Picture,
) -> Response:
    """A thumbnail response: 304 when the ETag matches, else ``read()`` under ``env``, rendered.

    The ETag covers the server version, ``version`` (what identifies the data and its
    state), the picture's query parameters, the format, the layer and the rendering.
    Outside the data the picture is transparent (PNG, WebP) or composited on white.
    """
    fmt = ImageType[picture.format]
    render = picture.render_params.as_dict()
    etag = _etag(
        __version__, *version, picture_params(request), fmt.value, picture.layer_params.as_dict(), render
    )
    headers = {"ETag": etag}
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    with rasterio.Env(**env):
        image = read()
    if picture.post_process:
        image = picture.post_process(image)
    if picture.background == "transparent" and fmt in (ImageType.png, ImageType.webp):
        content, media_type = factory.render_func(
            image, output_format=fmt, colormap=picture.colormap, **render
        )
    else:
        png, _ = factory.render_func(image, output_format=ImageType.png, colormap=picture.colormap, **render)
        content, media_type = _on_white(png, fmt), fmt.mediatype
    return Response(content, media_type=media_type, headers=headers)
