"""dinamis-tiler: dynamic tiles for SPOT 6/7 and Pléiades COGs catalogued in pgstac."""

__version__ = "0.1.0"

import logging as _logging

# stac_fastapi.types.core builds a default ApiSettings when it is imported (by `tiler.stac`), which
# warns that its title and version are the defaults. Ours are set in `tiler.stac.stac_app`, and the
# warning would come out before logging is configured: plain text among the JSON log lines.
_logging.getLogger("stac_fastapi.types.config").addFilter(
    lambda record: not record.getMessage().startswith("Using default values")
)
