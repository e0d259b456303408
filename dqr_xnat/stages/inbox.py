"""What a file in a project's inbox resource asks for, decided from its path alone.

Users drive dqr-xnat from XNAT's own file manager, so the path is the whole user interface:

* ``batch.csv``                    import with the project's default PACS
* ``<pacs>/batch.csv``             import from that PACS (one the admins allowed for the project)
* ``preview/batch.csv``            run the queries only; nothing is retrieved
* ``reimport/batch.csv``           import even studies an earlier job already landed
* folders combine in any order:    ``preview/hospital/batch.csv``; other folder names just organise
* ``batch.csv.cancel``             (any content) cancels the running job of ``batch.csv`` in that folder

The report of ``<dir>/<name>.csv`` is ``<dir>/<name>.report.csv`` (and ``.report.json``) in the
report resource, so a user finds it next to where they put the CSV.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Collection

from dqr_xnat.model import JobMode

PREVIEW_FOLDER = "preview"
REIMPORT_FOLDER = "reimport"
CANCEL_SUFFIX = ".cancel"
CSV_SUFFIX = ".csv"


@dataclass(frozen=True)
class InboxRequest:
    """One inbox file, interpreted. ``error`` is set when the path asks for something not allowed."""

    path: str  # relative to the inbox resource, '/'-separated
    kind: str  # "csv" | "cancel" | "ignored"
    mode: JobMode = JobMode.IMPORT
    pacs: str | None = None  # None = the project's default
    reimport: bool = False
    target: str = ""  # for "cancel": the CSV path it cancels
    error: str | None = None

    @property
    def report_base(self) -> str:
        """``<dir>/<name>`` of the CSV, to which ``.report.csv`` / ``.report.json`` are added."""
        return self.path[: -len(CSV_SUFFIX)] if self.path.lower().endswith(CSV_SUFFIX) else self.path


def interpret(path: str, *, allowed_pacs: Collection[str], known_pacs: Collection[str] = ()) -> InboxRequest:
    """Interpret ``path`` for a project allowed to use ``allowed_pacs`` (the first is the default).

    ``known_pacs`` are all PACS the site knows: a folder naming one the project may not use is an
    error the report explains, rather than a silent fallback to the default PACS.
    """
    clean = posixpath.normpath(path.replace("\\", "/")).lstrip("/")
    name = posixpath.basename(clean)
    lower = name.lower()
    if lower.endswith(CSV_SUFFIX + CANCEL_SUFFIX):
        return InboxRequest(clean, "cancel", target=clean[: -len(CANCEL_SUFFIX)])
    if not lower.endswith(CSV_SUFFIX) or name.startswith("."):
        return InboxRequest(clean, "ignored")
    folders = [f for f in posixpath.dirname(clean).split("/") if f]
    mode, reimport, pacs, error = JobMode.IMPORT, False, None, None
    for folder in folders:
        key = folder.lower()
        if key == PREVIEW_FOLDER:
            mode = JobMode.PREVIEW
        elif key == REIMPORT_FOLDER:
            reimport = True
        elif folder in allowed_pacs:
            if pacs is not None and pacs != folder:
                error = f"the path names two PACS, '{pacs}' and '{folder}'; keep one folder"
            pacs = folder
        elif folder in known_pacs:
            allowed = ", ".join(allowed_pacs)
            error = (f"this project may not use PACS '{folder}'; allowed: {allowed}. "
                     "Move the CSV into one of those folders or ask the XNAT admins")
    return InboxRequest(clean, "csv", mode=mode, pacs=pacs, reimport=reimport, error=error)
