"""The storage SCP served by the worker processes: C-MOVE sub-operations received on every core.

One pynetdicom receiver uses at most one core, and a PACS sends each C-MOVE's instances over one
association (pacs-notes §3, §5). :class:`ProcessStorageSCP` keeps the :class:`StorageSCP`
interface that :class:`~dqr_xnat.adapters.pacs.PacsClient` uses (``expect``, ``port``,
``ae_title``, the refusal counters) in the service process, but its listening socket is served by
every worker process of a :class:`~dqr_xnat.adapters.workers.WorkerPool`: each worker accepts
associations from it and writes the instances itself. A worker leaves a new association to
another one that has fewer open (a shared counter per worker, checked before ``accept``), so
concurrent C-MOVEs spread over the cores.

Nothing the receiver decides changes: a worker runs a :class:`StorageSCP` of its own with the same
handlers, refusals and log messages, on the same socket, and reports each outcome (stored,
oversize, write error, unexpected study, unreadable instance, rejected association) to the
service process, where the study's :class:`StudyReceipt` and the counters record it exactly as an
in-process receiver would. ``expect`` registers a study in every worker and waits until each has
confirmed before the C-MOVE is sent, so no sub-operation can reach a worker that does not know the
study yet; ``forget`` likewise waits, so every report of the study has arrived before the PACS
client judges the retrieval.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dqr_xnat.adapters.pacs import StorageSCP, StudyReceipt
from dqr_xnat.adapters.workers import WorkerContext, WorkerError, WorkerPool, operation
from dqr_xnat.config import PacsConfig, ReceiverConfig
from dqr_xnat.errors import PacsError, RetriablePacsError

log = logging.getLogger(__name__)

#: A worker that is busier than another leaves a new association to it for at most this long.
DEFER_SECONDS = 0.2
LISTEN_BACKLOG = 64


class ProcessStorageSCP(StorageSCP):
    """:class:`StorageSCP` whose associations are served by the worker processes of ``workers``."""

    def __init__(self, config: ReceiverConfig, allowed: Iterable[PacsConfig], staging_root: Path,
                 workers: WorkerPool) -> None:
        allowed = tuple(allowed)
        super().__init__(config, allowed, staging_root)
        self._allowed = allowed
        self.workers = workers
        self._listener: socket.socket | None = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.config.port
        return int(self._listener.getsockname()[1])

    def start(self) -> ProcessStorageSCP:
        if self._listener is not None:
            return self
        self.staging_root.mkdir(parents=True, exist_ok=True)
        address = (self.config.host, self.config.port)
        try:
            family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
            listener = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise PacsError(
                f"cannot listen on {self.config.host}:{self.config.port} as {self.config.ae_title}: "
                f"{exc.strerror or exc}; check receiver.host/port in the configuration"
            ) from exc
        listener.setblocking(False)  # workers race for each connection; the losers must not block
        self._listener = listener
        self.workers.on_event = self._on_worker_event
        try:
            self.workers.broadcast("receiver_start", listener, self.config, self._allowed, str(self.staging_root))
        except BaseException:
            self.stop()
            raise
        log.info("receiver %s listening on %s:%d in %d worker process(es)", self.ae_title,
                 self.config.host, self.port, len(self.workers.alive))
        return self

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            self.workers.broadcast("receiver_stop")
        except WorkerError as exc:
            log.warning("receiver: a worker process did not stop cleanly: %s", exc)
        listener.close()

    @contextmanager
    def expect(self, study_instance_uid: str, directory: Path) -> Iterator[StudyReceipt]:
        with super().expect(study_instance_uid, directory) as receipt:
            self._broadcast("receiver_expect", study_instance_uid, str(directory))
            try:
                yield receipt
            finally:
                self._broadcast("receiver_forget", study_instance_uid)

    def _broadcast(self, name: str, *args: Any) -> None:
        try:
            self.workers.broadcast(name, *args)
        except WorkerError as exc:
            raise RetriablePacsError(f"our receiver's worker processes failed ({exc})") from exc

    def _on_worker_event(self, kind: str, args: tuple[Any, ...]) -> None:
        """A worker's report about one instance or association, counted here as if it were ours."""
        if kind == "unexpected":
            with self._lock:
                self.refused_unexpected += 1
            return
        if kind == "rejected":
            with self._lock:
                self.rejected_associations += 1
            return
        if kind == "unreadable":
            with self._lock:
                self.refused_unreadable += 1
            return
        with self._lock:
            receipt = self._expected.get(args[0])
        if receipt is None:
            return
        if kind == "stored":
            receipt.record(args[1], args[2])
        elif kind == "oversize":
            receipt.record_oversize()
        elif kind == "error":
            receipt.record_error(args[1])


# ------------------------------------------------------------------------------------------
# In the worker process


class _ReportingReceipt(StudyReceipt):
    """A worker's receipt: every outcome is also reported to the service process."""

    def __init__(self, study_instance_uid: str, directory: Path, *, max_bytes: int,
                 context: WorkerContext) -> None:
        super().__init__(study_instance_uid, directory, max_bytes=max_bytes)
        self._context = context

    def record(self, name: str, series_instance_uid: str) -> None:
        super().record(name, series_instance_uid)
        self._context.send(("event", "stored", (self.study_instance_uid, name, series_instance_uid)))

    def record_oversize(self) -> None:
        super().record_oversize()
        self._context.send(("event", "oversize", (self.study_instance_uid,)))

    def record_error(self, message: str) -> None:
        super().record_error(message)
        self._context.send(("event", "error", (self.study_instance_uid, message)))


class _WorkerStorageSCP(StorageSCP):
    """The receiver inside one worker: serves the shared socket, reports what it does."""

    def __init__(self, config: ReceiverConfig, allowed: Iterable[PacsConfig], staging_root: Path,
                 listener: socket.socket, context: WorkerContext) -> None:
        super().__init__(config, allowed, staging_root)
        self._listener = listener
        self._context = context

    def _serve(self, ae: AE, handlers: list[Any]) -> Any:
        counted = [*handlers, (evt.EVT_CONN_OPEN, self._opened), (evt.EVT_CONN_CLOSE, self._closed)]
        server = ae.make_server(self._listener.getsockname(), evt_handlers=counted,
                                server_class=_SharedSocketServer, listener=self._listener,
                                busy=self._context.busy, index=self._context.index)
        thread = threading.Thread(target=server.serve_forever, name="receiver-accept", daemon=True)
        thread.start()
        return server

    def _opened(self, event: evt.Event) -> None:
        with self._context.busy.get_lock():
            self._context.busy[self._context.index] += 1

    def _closed(self, event: evt.Event) -> None:
        with self._context.busy.get_lock():
            self._context.busy[self._context.index] -= 1
            idle = self._context.busy[self._context.index] == 0
        if idle:
            self._context.sweep()

    def register(self, study_instance_uid: str, directory: Path) -> None:
        receipt = _ReportingReceipt(study_instance_uid, directory,
                                    max_bytes=self.config.max_instance_mb * 2**20, context=self._context)
        with self._lock:
            self._expected[study_instance_uid] = receipt

    def unregister(self, study_instance_uid: str) -> None:
        with self._lock:
            self._expected.pop(study_instance_uid, None)

    def _receipt_for(self, study_instance_uid: str) -> StudyReceipt | None:
        receipt = super()._receipt_for(study_instance_uid)
        if receipt is None:
            self._context.send(("event", "unexpected", (study_instance_uid,)))
        return receipt

    def _on_rejected(self, event: evt.Event) -> None:
        super()._on_rejected(event)
        self._context.send(("event", "rejected", ()))

    def _on_unreadable(self) -> None:
        super()._on_unreadable()
        self._context.send(("event", "unreadable", ()))


class _SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's server on a listening socket that other processes accept from too."""

    def __init__(self, ae: AE, address: Any, ae_title: str, contexts: Any, ssl_context: Any = None, *,
                 evt_handlers: Any, listener: socket.socket, busy: Any, index: int) -> None:
        self._listener = listener
        self._busy = busy
        self._index = index
        self._deferred_since = 0.0
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers=evt_handlers)

    def server_bind(self) -> None:
        self.socket.close()  # the fresh socket socketserver made; ours is already bound
        self.socket = self._listener
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, unless a less busy worker should take this association (then let it)."""
        counts = self._busy[:]
        if counts[self._index] > min(counts):
            now = time.monotonic()
            if now - self._deferred_since > 4 * DEFER_SECONDS:
                self._deferred_since = now  # a new connection is waiting
            if now - self._deferred_since < DEFER_SECONDS:
                time.sleep(DEFER_SECONDS / 20)
                raise BlockingIOError("left to a less busy worker")  # socketserver ignores OSError here
        return super().get_request()  # BlockingIOError when another worker was quicker

    def server_close(self) -> None:
        """Close our copy only: shutting the socket down would stop it for every process."""
        self.socket.close()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)  # pynetdicom's also unregisters from ae.start_server's list
        self.server_close()


@operation("receiver_start")
def _receiver_start(context: WorkerContext, listener: socket.socket, config: ReceiverConfig,
                    allowed: tuple[PacsConfig, ...], staging_root: str) -> None:
    receiver = _WorkerStorageSCP(config, allowed, Path(staging_root), listener, context)
    context.receiver = receiver.start()


@operation("receiver_expect")
def _receiver_expect(context: WorkerContext, study_instance_uid: str, directory: str) -> None:
    context.receiver.register(study_instance_uid, Path(directory))


@operation("receiver_forget")
def _receiver_forget(context: WorkerContext, study_instance_uid: str) -> None:
    context.receiver.unregister(study_instance_uid)


@operation("receiver_stop")
def _receiver_stop(context: WorkerContext) -> None:
    receiver, context.receiver = context.receiver, None
    if receiver is not None:
        receiver.stop()
