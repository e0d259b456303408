"""The exception tree.

Adapters translate library errors (pynetdicom statuses, HTTP errors, sqlite errors) into these;
only the per-task boundary in the pipeline and ``cli.main`` catch everything. ``RetriableError``
marks transient failures: the pipeline retries those with backoff, and nothing else.
"""

from __future__ import annotations


class DqrError(Exception):
    """Root of every error dqr-xnat raises on purpose."""


class RetriableError(DqrError):
    """Mix-in: the operation may succeed if tried again later (network, timeouts, 5xx)."""


class ConfigError(DqrError, ValueError):
    """The configuration is invalid; ``problems`` lists every problem with its YAML path."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class CsvFileError(DqrError, ValueError):
    """The CSV cannot be read at all (missing, unreadable, wrong encoding, too large)."""


class PacsError(DqrError):
    """A PACS refused, failed or answered something we cannot use."""

    def __init__(self, message: str, *, pacs: str = "") -> None:
        self.pacs = pacs
        super().__init__(f"PACS '{pacs}': {message}" if pacs else message)


class RetriablePacsError(PacsError, RetriableError):
    """Association refused/aborted, timeout, dropped connection, incomplete transfer."""


class IncompleteRetrieveError(RetriablePacsError):
    """The PACS announced more instances than arrived (even if it reported success)."""


class VerificationError(DqrError):
    """A retrieved study does not meet a row criterion the PACS could not check for us."""


class XnatError(DqrError):
    """XNAT refused or failed a request."""

    def __init__(self, message: str, *, project: str = "", status: int | None = None) -> None:
        self.project = project
        self.status = status
        super().__init__(message)


class RetriableXnatError(XnatError, RetriableError):
    """HTTP 408/429/5xx, timeouts, connection errors."""


class XnatAuthError(XnatError):
    """Login failed, or the service account lacks a permission it needs."""


class WrongProjectError(XnatError):
    """XNAT placed an upload somewhere else than the project asked for (e.g. Unassigned)."""


class LabelError(DqrError, ValueError):
    """A label is not a legal XNAT label."""


class RelabelError(DqrError, ValueError):
    """A relabel value cannot be written into the DICOM (too long, wrong form for its VR)."""


class StoreError(DqrError):
    """The job store is unusable (corrupt, locked, unwritable)."""


class CancelledError(DqrError):
    """The job was cancelled by the user or operator."""


class StopRequested(CancelledError):
    """The service is stopping (SIGTERM): work stops between steps and resumes at the next start."""
