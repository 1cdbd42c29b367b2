"""TileMatrixSets offered by the server: the grids French GIS users work in.

Only these are listed in WMTS capabilities, TileJSON and `/tileMatrixSets`;
morecantile's other grids (Canadian, Antarctic...) would only clutter clients.
"""

from __future__ import annotations

import morecantile
from morecantile import TileMatrixSets

#: Identifiers, in the order clients list them.
OFFERED = ("WebMercatorQuad", "WGS1984Quad", "WorldCRS84Quad", "EuropeanETRS89_LAEAQuad", "UTM31WGS84Quad")

supported_tms: TileMatrixSets = TileMatrixSets({name: morecantile.tms.get(name) for name in OFFERED})
