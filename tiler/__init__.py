"""dinamis-tiler: dynamic tiles for SPOT 6/7 and Pléiades COGs catalogued in pgstac."""

__version__ = "0.1.0"
