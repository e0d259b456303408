"""dqr-xnat: bulk DICOM query/retrieve from a PACS into XNAT prearchives, driven by CSVs in XNAT."""

import logging

__version__ = "0.1.0"

# The library logs quietly; the CLI decides where logs go.
logging.getLogger("dqr_xnat").addHandler(logging.NullHandler())
