"""TileMatrixSets offered by the server: the grids French GIS users work in.

Only these are listed in WMTS capabilities, TileJSON and `/tileMatrixSets`;
morecantile's other grids (Canadian, Antarctic...) would only clutter clients.

``LAMB93`` is IGN's Lambert-93 grid, the one the Géoplateforme WMTS
(data.geopf.fr/wmts, formerly wxs.ign.fr) publishes as TileMatrixSet "LAMB93":
EPSG:2154, top-left corner (0, 12 000 000), 256 px tiles, levels 0-21. Its
identifier is kept as IGN spells it so that a client holding both services sees
one grid, and tiles of ours line up with Géoportail tiles of the same level, row
and column. Figures from:

* IGN's ROK4 grid definitions, from which the Géoplateforme capabilities are
  generated: https://github.com/rok4/tilematrixsets, ``LAMB93.json``
  (commit 8f63544cd2298a17cc3121d085f614d84ab36797): ``id`` LAMB93, ``crs``
  EPSG:2154, ``pointOfOrigin`` [0, 12000000], ``cellSize`` and matrix sizes
  per level (copied below).
* Cross-checked against IGN's Leaflet extension
  (https://github.com/IGNF/geoportal-extensions, ``src/Leaflet/CRS/EPSG2154.js``:
  the same 22 resolutions and origin [0, 12000000]) and against a recorded
  Géoportail WMTS GetCapabilities whose LAMB93 ``ScaleDenominator`` values
  (373497230.5353357571875677 at level 0 ...) are ``cellSize / 0.00028``.

The scale denominators are derived here the same way (OGC's 0.28 mm pixel,
metres); ``tests/test_tms.py`` compares them with the capabilities' values.

UTM 30, 31 and 32 North on WGS84 cover metropolitan France. morecantile ships
OGC's ``UTM31WGS84Quad``; ``UTM30WGS84Quad`` and ``UTM32WGS84Quad`` reuse its
matrices unchanged (origin, cell sizes, matrix sizes are zone-relative, false
easting 500 000 m) with their own CRS. They have no OGC registry URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import morecantile
import numpy as np
import pyproj
from morecantile import TileMatrixSet, TileMatrixSets
from morecantile.models import crs_axis_inverted
from pyproj import Transformer
from rio_tiler.utils import CRS_to_urn

#: OGC "standardized rendering pixel size" (metres) relating cellSize and scaleDenominator.
PIXEL_SIZE = 0.28e-3

#: IGN LAMB93 levels 0-21: (cellSize in metres, matrixWidth, matrixHeight), from ROK4's LAMB93.json.
LAMB93_LEVELS: tuple[tuple[float, int, int], ...] = (
    (104579.224549894, 2, 2),
    (52277.5323537905, 2, 2),
    (26135.4870785954, 2, 2),
    (13066.8913818, 2, 3),
    (6533.2286041135, 2, 5),
    (3266.5595244627, 3, 9),
    (1633.2660045974, 5, 16),
    (816.629554986, 8, 30),
    (408.3139146768, 14, 59),
    (204.1567415109, 26, 117),
    (102.0783167832, 51, 232),
    (51.0391448966, 100, 462),
    (25.5195690743, 199, 922),
    (12.7597836936, 396, 1842),
    (6.379891636, 791, 3682),
    (3.1899457653, 1581, 7363),
    (1.5949728695, 3161, 14724),
    (0.7974864315, 6321, 29447),
    (0.3987432149, 12641, 58892),
    (0.1993716073, 25281, 117782),
    (0.0996858037, 50561, 235563),
    (0.0498429018, 101121, 471125),
)
LAMB93_ORIGIN = (0.0, 12_000_000.0)
TILE_SIZE = 256


def lamb93() -> TileMatrixSet:
    """IGN's Lambert-93 TileMatrixSet (Géoplateforme WMTS "LAMB93")."""
    return TileMatrixSet(
        id="LAMB93",
        title="Lambert-93 (RGF93 / EPSG:2154), IGN Géoplateforme WMTS grid",
        crs="http://www.opengis.net/def/crs/EPSG/0/2154",
        orderedAxes=["E", "N"],
        tileMatrices=[
            {
                "id": str(level),
                "scaleDenominator": cell / PIXEL_SIZE,
                "cellSize": cell,
                "pointOfOrigin": LAMB93_ORIGIN,
                "tileWidth": TILE_SIZE,
                "tileHeight": TILE_SIZE,
                "matrixWidth": width,
                "matrixHeight": height,
            }
            for level, (cell, width, height) in enumerate(LAMB93_LEVELS)
        ],
    )


def utm_wgs84_quad(zone: int) -> TileMatrixSet:
    """UTM zone ``zone`` North on WGS84, defined like OGC's ``UTM31WGS84Quad``."""
    if zone == 31:
        return morecantile.tms.get("UTM31WGS84Quad")
    template = morecantile.tms.get("UTM31WGS84Quad")
    return TileMatrixSet(
        id=f"UTM{zone}WGS84Quad",
        title=f"Universal Transverse Mercator Zone {zone} WGS84 Quad",
        crs=f"http://www.opengis.net/def/crs/EPSG/0/{32600 + zone}",
        orderedAxes=template.orderedAxes,
        tileMatrices=[m.model_dump(exclude_none=True) for m in template.tileMatrices],
    )


#: Identifiers, in the order clients list them.
OFFERED = (
    "WebMercatorQuad",
    "WGS1984Quad",
    "WorldCRS84Quad",
    "EuropeanETRS89_LAEAQuad",
    "LAMB93",
    "UTM30WGS84Quad",
    "UTM31WGS84Quad",
    "UTM32WGS84Quad",
)

_OURS = {tms.id: tms for tms in (lamb93(), utm_wgs84_quad(30), utm_wgs84_quad(31), utm_wgs84_quad(32))}


class SharedTileMatrixSets(TileMatrixSets):
    """morecantile's registry, handing out the registered grids themselves.

    `TileMatrixSets.get` deep-copies the grid at every call, and titiler calls it for
    every tile request: about 0.3 ms of pydantic deep copy per request, for grids that
    nothing modifies. Here a grid is built (or loaded) once and shared.
    """

    def get(self, identifier: str) -> TileMatrixSet:
        """The registered grid ``identifier`` (raises `InvalidIdentifier` like the parent)."""
        tms = self.tilematrixsets.get(identifier)
        if isinstance(tms, TileMatrixSet):
            return tms
        tms = super().get(identifier)  # unknown (raises) or a document to load once
        self.tilematrixsets[identifier] = tms
        return tms


supported_tms: TileMatrixSets = SharedTileMatrixSets(
    {name: _OURS[name] if name in _OURS else morecantile.tms.get(name) for name in OFFERED}
)


def bbox_in_tms(
    tms_id: str,
    lonlat_bbox: Sequence[float],
    native: tuple[Any, Sequence[float]] | None = None,
) -> dict | None:
    """Envelope of a layer in the CRS of TileMatrixSet ``tms_id``, for a WMTS ``ows:BoundingBox``.

    ``lonlat_bbox`` is the layer's WGS84BoundingBox. When ``native`` (CRS, bounds)
    describes the same extent, it is projected instead: an envelope of the native
    bounds is tighter than an envelope of their WGS84 envelope. Returns
    ``{"crs": urn, "lower": (a, b), "upper": (c, d)}`` with corners in the axis
    order of that CRS, or None for an unknown TileMatrixSet or a CRS without URN.
    """
    if tms_id not in supported_tms.list():
        return None
    tms = supported_tms.get(tms_id)
    urn = CRS_to_urn(tms.rasterio_crs)
    if urn is None:
        return None
    crs = pyproj.CRS.from_user_input(tms.crs.srs)
    src_crs, bounds = pyproj.CRS.from_user_input("OGC:CRS84"), lonlat_bbox
    if native is not None:
        native_crs = pyproj.CRS.from_user_input(native[0])
        to_lonlat = Transformer.from_crs(native_crs, "OGC:CRS84", always_xy=True)
        if np.allclose(to_lonlat.transform_bounds(*native[1], densify_pts=21), lonlat_bbox, atol=1e-6):
            src_crs, bounds = native_crs, native[1]
    to_tms = Transformer.from_crs(src_crs, crs, always_xy=True)
    minx, miny, maxx, maxy = to_tms.transform_bounds(*bounds, densify_pts=21)
    if crs_axis_inverted(crs):
        return {"crs": urn, "lower": (miny, minx), "upper": (maxy, maxx)}
    return {"crs": urn, "lower": (minx, miny), "upper": (maxx, maxy)}
