"""Routes of AOI exports (`tiler.export`) and of export jobs (`tiler.jobs`).

* ``GET|POST /collections/{c}/items/{i}/export.tif``: the GeoTIFF, at once, within
  ``TILER_EXPORT_MAX_*``; past the cap a 400 that states it and names the alternatives.
* ``POST /collections/{c}/items/{i}/export-jobs``: the same export as a job (202), within
  ``TILER_JOBS_MAX_*`` (only when ``TILER_JOBS_REDIS_URL`` is set).
* ``GET /jobs``, ``GET /jobs/{id}``, ``GET /jobs/{id}/result``, ``DELETE /jobs/{id}``: the
  caller's jobs; someone else's job is a 404.

Exports need the ``data`` right on the collection (a grant or URL token limited by
``max_zoom`` never has it); the job routes check the owner themselves.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from rasterio.features import bounds as geometry_bounds
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from tiler.export import (
    GRIDS,
    PANSHARPENED,
    RESAMPLINGS,
    ExportRequest,
    Grid,
    check_size,
    file_name,
    open_product,
    output_grid,
    parse_bands,
    parse_bbox,
    write_export,
)
from tiler.limits import check_geojson
from tiler.operations import ACCOUNT, EXPORT, EXPORT_JOB
from tiler.settings import Settings
from tiler.stream import stream_filename

if TYPE_CHECKING:
    from tiler.jobs import JobQueue

ITEM = "/collections/{collection_id}/items/{item_id}"
GEOTIFF = "image/tiff; application=geotiff"


@dataclass
class ExportParams:
    """Query parameters of an export (the box is optional on POST: the feature gives it)."""

    bbox: Annotated[
        str | None,
        Query(
            description="minx,miny,maxx,maxy in `bbox-crs`; widened outward to whole pixels.",
            examples=["3.87,43.6,3.88,43.61"],
        ),
    ] = None
    bbox_crs: Annotated[
        str,
        Query(
            alias="bbox-crs",
            description="CRS of `bbox` (and of a POSTed feature): EPSG:<code>, its OGC URI, or CRS84.",
        ),
    ] = "EPSG:4326"
    asset: Annotated[
        str | None,
        Query(
            description=f"Asset key of the item (e.g. `ms`, `pan`) or `{PANSHARPENED}`; default: the multispectral asset."
        ),
    ] = None
    bands: Annotated[
        str | None,
        Query(
            description="Comma-separated bands of the asset: names (`B2`), common names (`red`) or numbers; default all."
        ),
    ] = None
    grid: Annotated[
        Literal["native", "l93-0.5", "l93-1.5", "l93-6"],
        Query(
            description="`native`: the asset's own grid, no resampling; `l93-<step>`: Lambert-93 on a <step> m grid."
        ),
    ] = "native"
    resampling: Annotated[
        Literal["nearest", "bilinear", "cubic", "average"],
        Query(description="Resampling of a Lambert-93 grid (ignored on the native grid)."),
    ] = "nearest"

    def request(self, collection_id: str, item_id: str, feature: dict | None = None) -> ExportRequest:
        """The `ExportRequest` of these parameters (and of a GeoJSON feature or geometry)."""
        geometry = None
        if feature is not None:
            check_geojson(feature)
            geometry = feature.get("geometry") if feature.get("type") == "Feature" else feature
            if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
                raise HTTPException(
                    400, "The body must be a GeoJSON Feature (or geometry) of a Polygon or MultiPolygon"
                )
            try:
                box = tuple(float(v) for v in geometry_bounds(geometry))
            except (KeyError, TypeError, ValueError, IndexError):
                raise HTTPException(400, "The body's geometry has no valid coordinates") from None
        if self.bbox is not None:
            box = parse_bbox(self.bbox)
        elif feature is None:
            raise HTTPException(400, "`bbox` is required (minx,miny,maxx,maxy)")
        return ExportRequest(
            collection_id=collection_id,
            item_id=item_id,
            bbox=box,  # type: ignore[arg-type]
            bbox_crs=self.bbox_crs,
            asset=self.asset,
            bands=parse_bands(self.bands),
            grid=self.grid,
            resampling=self.resampling,
            geometry=geometry,
        )


Feature = Annotated[
    dict[str, Any] | None, Body(description="A GeoJSON Feature or geometry (Polygon, MultiPolygon).")
]


def _advice(request: Request, req: ExportRequest, item: Any, jobs: JobQueue | None) -> str:
    """Where to go instead: a job, and the raw COG streams of the item's assets (paths without tokens)."""
    c, i = quote(req.collection_id, safe=""), quote(req.item_id, safe="")
    keys = [
        k for k, a in item.assets.items() if (a.media_type or "image/tiff").lower().startswith("image/tiff")
    ]
    streams = [
        f"/stream/collections/{c}/items/{i}/assets/{quote(k, safe='')}/"
        + quote(stream_filename(req.item_id, k, item.assets[k].href, item.assets[k].media_type), safe="")
        for k in keys
        if "data" in (item.assets[k].roles or [])
    ]
    out = "Ask for a smaller `bbox`"
    if jobs is not None:
        s = jobs.settings
        out += (
            f", submit it as a job (POST {ITEM.format(collection_id=c, item_id=i)}/export-jobs with the same "
            f"parameters; up to {s.max_size} px a side and {s.max_pixels:,} px)"
        )
    out += f", or read the whole COGs with HTTP Range requests: {', '.join(streams)} (links in /stac/collections/{c}/items/{i})."
    return out


def _planned(request: Request, req: ExportRequest) -> tuple[Any, Any, Any]:
    cat = request.app.state.catalogue
    item = cat.item(req.collection_id, req.item_id)
    ctx = cat.presets(collection_id=req.collection_id, item_id=req.item_id, item=item)
    return cat, item, ctx


def export_router(settings: Settings) -> APIRouter:
    """``export.tif`` of an item (GET with a box, POST with a feature)."""
    router = APIRouter(tags=["Exports"])
    caps = settings.export
    gdal = settings.gdal.env_options()

    def export(request: Request, req: ExportRequest) -> Response:
        cat, item, ctx = _planned(request, req)
        with open_product(item, req, ctx, gdal) as product:
            grid = output_grid(product, req)
            advice = _advice(request, req, item, getattr(request.app.state, "jobs", None))
            check_size(
                grid,
                caps.max_size,
                caps.max_pixels,
                "a direct export (TILER_EXPORT_MAX_SIZE, TILER_EXPORT_MAX_PIXELS)",
                advice,
            )
            fd, path = tempfile.mkstemp(prefix="dinamis-export-", suffix=".tif")
            os.close(fd)
            try:
                write_export(path, item, cat.collection(req.collection_id), req, product, grid)
            except BaseException:
                os.unlink(path)
                raise
        return FileResponse(
            path,
            media_type=GEOTIFF,
            filename=file_name(req),
            background=BackgroundTask(os.unlink, path),
            headers={"X-Export-Size": f"{grid.width}x{grid.height}"},
        )

    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {GEOTIFF: {}}, "description": "The GeoTIFF."}
    }
    summary = "A box of one item as a GeoTIFF on the scene's own grid (raw values, mask, STAC metadata)."

    @router.get(
        ITEM + "/export.tif",
        summary=summary,
        response_class=FileResponse,
        responses=responses,
        dependencies=[EXPORT.depends()],
    )
    def export_get(
        request: Request, collection_id: str, item_id: str, params: Annotated[ExportParams, Depends()]
    ) -> Response:
        return export(request, params.request(collection_id, item_id))

    @router.post(
        ITEM + "/export.tif",
        summary=summary + " Pixels outside the feature are masked.",
        response_class=FileResponse,
        responses=responses,
        dependencies=[EXPORT.depends()],
    )
    def export_post(
        request: Request,
        collection_id: str,
        item_id: str,
        params: Annotated[ExportParams, Depends()],
        feature: Feature = None,
    ) -> Response:
        if feature is None:
            raise HTTPException(400, "POST needs a GeoJSON Feature body (or use GET with `bbox`)")
        return export(request, params.request(collection_id, item_id, feature))

    return router


def _principal(request: Request) -> Any:
    principal = getattr(request.state, "principal", None)
    if getattr(request.app.state, "auth", None) is None:
        return None  # access control off: one owner for all
    if principal is None or principal.anonymous:
        raise HTTPException(401, "Sign in to use export jobs", headers={"WWW-Authenticate": "Bearer"})
    if principal.token is not None and (
        principal.token.item is not None or principal.token.search is not None
    ):
        raise HTTPException(403, "This URL token is limited to one item or search")
    return principal


def jobs_router(settings: Settings) -> APIRouter:
    """Submission of export jobs on an item, and the caller's jobs."""
    router = APIRouter(tags=["Export jobs"])
    gdal = settings.gdal.env_options()

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def queue(request: Request) -> JobQueue:
        return request.app.state.jobs

    @router.post(
        ITEM + "/export-jobs",
        status_code=202,
        summary="Submit the export of a box (or a POSTed feature) as a job; poll /jobs/{id}, then download.",
        dependencies=[EXPORT_JOB.depends()],
    )
    def submit(
        request: Request,
        collection_id: str,
        item_id: str,
        params: Annotated[ExportParams, Depends()],
        feature: Feature = None,
    ) -> JSONResponse:
        principal = _principal(request)
        req = params.request(collection_id, item_id, feature)
        jobs = queue(request)
        _, item, ctx = _planned(request, req)
        with open_product(item, req, ctx, gdal) as product:
            grid: Grid = output_grid(product, req)
        check_size(
            grid,
            jobs.settings.max_size,
            jobs.settings.max_pixels,
            "an export job (TILER_JOBS_MAX_SIZE, TILER_JOBS_MAX_PIXELS)",
        )
        job = jobs.submit(principal, req, grid)
        body = jobs.status(job, base(request))
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})

    @router.get("/jobs", summary="The caller's export jobs, newest first.", dependencies=[ACCOUNT.depends()])
    def list_jobs(request: Request) -> dict[str, Any]:
        jobs = queue(request)
        return {"jobs": [jobs.status(j, base(request)) for j in jobs.list(_principal(request))]}

    @router.get(
        "/jobs/{job_id}",
        summary="Status of an export job (queued, running, done, failed).",
        dependencies=[ACCOUNT.depends()],
    )
    def job_status(request: Request, job_id: str) -> dict[str, Any]:
        jobs = queue(request)
        return jobs.status(jobs.get(_principal(request), job_id), base(request))

    @router.get(
        "/jobs/{job_id}/result",
        summary="The GeoTIFF of a finished export job.",
        response_class=FileResponse,
        responses={200: {"content": {GEOTIFF: {}}}, 409: {"description": "Not finished."}},
        dependencies=[ACCOUNT.depends()],
    )
    def job_result(request: Request, job_id: str) -> Response:
        jobs = queue(request)
        job = jobs.get(_principal(request), job_id)
        status = jobs.status(job, base(request))
        if status["status"] != "done":
            return JSONResponse(
                {"detail": f"The job is {status['status']}, not done", "status": status}, status_code=409
            )
        req = ExportRequest.from_dict(status["request"])
        return FileResponse(jobs.result_path(job.id), media_type=GEOTIFF, filename=file_name(req))

    @router.delete(
        "/jobs/{job_id}",
        status_code=204,
        summary="Cancel an export job and delete its file.",
        dependencies=[ACCOUNT.depends()],
    )
    def job_delete(request: Request, job_id: str) -> Response:
        queue(request).cancel(_principal(request), job_id)
        return Response(status_code=204)

    return router


__all__ = ["GRIDS", "RESAMPLINGS", "export_router", "jobs_router"]
