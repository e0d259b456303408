"""Worker processes: the CPU-bound steps of a retrieval on every core.

pynetdicom and pydicom are pure Python, so one process uses at most one core (the GIL):
pacs-notes §5 measured one pynetdicom receiver at about a third of DCMTK's storescp on 2 cores.
The service therefore runs ``service.processes`` worker processes (default: one per core). Each
serves the receiver's listening socket (:mod:`dqr_xnat.adapters.receivers`: C-MOVE
sub-operations land in whichever worker is least busy), runs C-GET retrievals, and relabels
slices of a study's files. The service process keeps everything that decides: the job store, the
PACS association limits, the XNAT session, the pipeline's states. Workers only do file and network
work on the paths and settings they are given, and hold no state between calls besides the
receiver's list of studies being retrieved.

Protocol: one duplex pipe per worker. The service sends ``(request_id, operation, args)``; the
worker runs the operation in one of its threads and answers ``("result", request_id, ok,
value)``, where a failure is the exception rebuilt in the service with its class and attributes
(so a ``RelabelError`` stays a ``RelabelError``). A worker also sends ``("event", kind, args)``
(the receiver's outcomes) and ``("log", logger, level, message)``: its log records, re-emitted
through the service's logging so that its handlers and redaction apply.

Workers start by 'spawn' (never fork a process that runs threads), ignore SIGINT (the service
stops them), and exit as soon as their pipe closes, so they never outlive the service, even one
killed with SIGKILL. Each has a temporary directory of its own on the staging filesystem (so that
pynetdicom's chunked files are renamed into place, not copied): files an aborted transfer left
there are removed once idle for a while, and the whole directory when the worker stops.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from dqr_xnat.errors import RetriableError, RetriablePacsError

if TYPE_CHECKING:
    from dqr_xnat.adapters.pacs import PacsClient, StorageSCP
    from dqr_xnat.config import PacsConfig, ReceiverConfig
    from dqr_xnat.model import RetrieveResult

log = logging.getLogger(__name__)

#: Threads per worker: C-GETs and relabel slices of several studies run side by side.
WORKER_THREADS = 8
#: How long the service waits for every worker to start (imports) or to confirm a broadcast.
START_TIMEOUT = 60.0
BROADCAST_TIMEOUT = 30.0
#: Loggers whose levels a worker copies from the service (pynetdicom logs identifiers below WARNING).
COPIED_LEVELS = ("", "dqr_xnat", "pynetdicom")
#: The open-association count a dead worker shows, so that nobody waits for it to accept.
DEAD_WORKER_LOAD = 1 << 20
#: A temporary file untouched for this long is left over from an aborted transfer.
ORPHAN_SECONDS = 2.0


class WorkerError(RetriableError):
    """A worker process died or cannot be reached; the work may succeed when tried again."""


def default_processes() -> int:
    """One worker per core: the receiving and relabeling they do is CPU-bound."""
    return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------
# Operations (run in the worker)


@dataclass
class WorkerContext:
    """What an operation running in a worker can use besides its arguments."""

    index: int
    send: Callable[[tuple[Any, ...]], None]
    busy: Any  # multiprocessing Array('i'): open associations per worker (receivers.py balances on it)
    tempdir: Path | None = None  # where pynetdicom writes incoming data sets
    receiver: Any = None  # the worker's receiver, once started (receivers.py)

    def sweep(self) -> None:
        """Remove what aborted transfers left in the temporary directory (files idle for a while)."""
        if self.tempdir is None:
            return
        for path in self.tempdir.iterdir():
            try:
                if time.time() - path.stat().st_mtime > ORPHAN_SECONDS:
                    path.unlink()
            except OSError:
                continue  # taken meanwhile


Operation = Callable[..., Any]
OPERATIONS: dict[str, Operation] = {}
#: Modules a worker imports at start: they register operations of their own.
OPERATION_MODULES = ("dqr_xnat.adapters.receivers",)


def operation(name: str) -> Callable[[Operation], Operation]:
    """Register ``fn(context, *args)`` as the worker operation ``name``."""

    def register(fn: Operation) -> Operation:
        OPERATIONS[name] = fn
        return fn

    return register


@operation("ping")
def _ping(context: WorkerContext) -> int:
    return os.getpid()


@operation("relabel")
def _relabel(context: WorkerContext, sources: Sequence[str], out: str, plan: Mapping[str, str]) -> int:
    from dqr_xnat.adapters.dicom_files import relabel_file

    for source in map(Path, sources):
        relabel_file(source, Path(out) / source.name, plan)
    return len(sources)


@operation("retrieve")
def _retrieve(
    context: WorkerContext,
    pacs: PacsConfig,
    receiver: ReceiverConfig | None,
    staging_root: str | None,
    study_uid: str,
    directory: str,
    series_uids: tuple[str, ...] | None,
    expected: int | None,
) -> RetrieveResult:
    """A C-GET on this worker's core; the service holds the association slot meanwhile."""
    from dqr_xnat.adapters.pacs import PacsClient, StorageSCP

    scp = None
    if receiver is not None and staging_root is not None:
        scp = StorageSCP(receiver, [pacs], Path(staging_root))  # not started: C-GET reads its settings
    client = PacsClient(pacs, limiter=_NO_LIMIT)
    try:
        return client.retrieve(study_uid, Path(directory), series_uids=series_uids, expected=expected,
                               receiver=scp)
    finally:
        context.sweep()


class _NoLimit:
    """The service process holds the PACS's association slot for the whole call."""

    def slot(self, pacs: PacsConfig) -> AbstractContextManager[None]:
        return nullcontext()


_NO_LIMIT = _NoLimit()


# ------------------------------------------------------------------------------------------
# The worker's main loop


def _worker_main(conn: Connection, index: int, busy: Any, levels: Mapping[str, int],
                 tempdir: str | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            conn.send(message)

    _forward_logs(send, levels)
    for module in OPERATION_MODULES:
        importlib.import_module(module)
    context = WorkerContext(index, send, busy)
    if tempdir is not None:
        context.tempdir = Path(tempdir)
        shutil.rmtree(context.tempdir, ignore_errors=True)
        context.tempdir.mkdir(parents=True)
        tempfile.tempdir = tempdir
    threads = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix=f"worker{index}")
    while True:
        try:
            request_id, name, args = conn.recv()
        except (EOFError, OSError):
            break  # the service is gone
        if name == "stop":
            break
        threads.submit(_run, context, request_id, name, args)
    if context.receiver is not None:
        context.receiver.stop()
    if context.tempdir is not None:
        shutil.rmtree(context.tempdir, ignore_errors=True)
    os._exit(0)  # do not wait for operations still running: nobody wants their answer


def _run(context: WorkerContext, request_id: int, name: str, args: tuple[Any, ...]) -> None:
    try:
        value = OPERATIONS[name](context, *args)
    except BaseException as exc:  # every failure goes back to the caller, whatever it is
        answer: tuple[Any, ...] = ("result", request_id, False, _describe(exc))
    else:
        answer = ("result", request_id, True, value)
    try:
        context.send(answer)
    except (OSError, pickle.PicklingError, TypeError) as exc:
        context.send(("result", request_id, False, _describe(WorkerError(f"cannot send the result: {exc}"))))


def _describe(exc: BaseException) -> tuple[str, str, tuple[Any, ...], dict[str, Any], str]:
    """An exception as plain data: class, args, picklable attributes and the traceback text."""
    state = {}
    for key, value in vars(exc).items():
        try:
            pickle.dumps(value)
        except Exception:
            continue
        state[key] = value
    try:
        args = tuple(pickle.loads(pickle.dumps(exc.args)))
    except Exception:
        args = tuple(map(str, exc.args))
    text = "".join(traceback.format_exception(exc))
    return type(exc).__module__, type(exc).__qualname__, args, state, text


def _rebuild(index: int, description: tuple[str, str, tuple[Any, ...], dict[str, Any], str]) -> BaseException:
    module, qualname, args, state, text = description
    try:
        cls = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(qualname)
        exc = cls.__new__(cls, *args)  # no __init__ (its signature may differ); OSError takes errno here
        exc.args = args
        exc.__dict__.update(state)
    except Exception:
        exc = WorkerError(f"{qualname}: {', '.join(map(str, args))}")
    exc.add_note(f"raised in worker process {index}:\n{text}")
    return exc


class _ForwardingHandler(logging.Handler):
    """Sends a worker's log records to the service, which logs them with its own handlers."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self._send(("log", record.name, record.levelno, message))
        except Exception:
            self.handleError(record)


def _forward_logs(send: Callable[[tuple[Any, ...]], None], levels: Mapping[str, int]) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ForwardingHandler(send))
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


# ------------------------------------------------------------------------------------------
# The service's side


class _Worker:
    """One worker process as the service sees it: its pipe, its calls in flight."""

    def __init__(self, pool: WorkerPool, index: int, process: Any, conn: Connection) -> None:
        self.pool = pool
        self.index = index
        self.process = process
        self.conn = conn
        self.pending: dict[int, Future[Any]] = {}
        self._send_lock = threading.Lock()
        self.alive = True
        self.reader = threading.Thread(target=self._read, name=f"dqr-worker-{index}-reader", daemon=True)
        self.reader.start()

    @property
    def load(self) -> int:
        return len(self.pending)

    def call(self, name: str, args: tuple[Any, ...]) -> Future[Any]:
        future: Future[Any] = Future()
        request_id = next(self.pool._ids)
        self.pending[request_id] = future
        try:
            with self._send_lock:
                self.conn.send((request_id, name, args))
        except (OSError, ValueError) as exc:
            self.pending.pop(request_id, None)
            future.set_exception(WorkerError(f"worker process {self.index} cannot be reached: {exc}"))
        return future

    def stop(self) -> None:
        try:
            with self._send_lock:
                self.conn.send((-1, "stop", ()))
        except (OSError, ValueError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "result":
                _, request_id, ok, value = message
                future = self.pending.pop(request_id, None)
                if future is not None:
                    future.set_result(value) if ok else future.set_exception(_rebuild(self.index, value))
            elif kind == "event":
                self.pool._event(message[1], message[2])
            elif kind == "log":
                logging.getLogger(message[1]).log(message[2], "%s", message[3])
        self.alive = False
        if self.pool.busy is not None:
            with self.pool.busy.get_lock():
                self.pool.busy[self.index] = DEAD_WORKER_LOAD  # no live worker leaves it an association
        if not self.pool._stopping:
            log.error("worker process %d exited unexpectedly (exit code %s); %d worker(s) left",
                      self.index, self.process.exitcode, sum(w.alive for w in self.pool.workers))
        for future in list(self.pending.values()):
            if not future.done():
                future.set_exception(WorkerError(f"worker process {self.index} exited"))
        self.pending.clear()


class WorkerPool:
    """``processes`` worker processes; start() before use, stop() at the end (or use ``with``).

    ``temp_root``: the workers' temporary directories go below it; put it on the staging
    filesystem. None: the system's temporary directory.
    """

    def __init__(self, processes: int | None = None, *, temp_root: Path | None = None) -> None:
        self.size = processes or default_processes()
        self.temp_root = temp_root
        self.workers: list[_Worker] = []
        self.on_event: Callable[[str, tuple[Any, ...]], None] | None = None
        self.busy: Any = None  # shared Array: open associations per worker (receivers.py)
        self._ids = itertools.count()
        self._stopping = False

    def __enter__(self) -> WorkerPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> WorkerPool:
        if self.workers:
            return self
        ctx = multiprocessing.get_context("spawn")
        self.busy = busy = ctx.Array("i", self.size)
        levels = {name: logging.getLogger(name or None).getEffectiveLevel() for name in COPIED_LEVELS}
        for index in range(self.size):
            ours, theirs = ctx.Pipe(duplex=True)
            tempdir = str(self.temp_root / f"worker-{index}") if self.temp_root is not None else None
            process = ctx.Process(target=_worker_main, args=(theirs, index, busy, levels, tempdir),
                                  name=f"dqr-xnat-worker-{index}", daemon=True)
            process.start()
            theirs.close()
            self.workers.append(_Worker(self, index, process, ours))
        try:
            self.broadcast("ping", timeout=START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        log.info("%d worker process(es) started", self.size)
        return self

    def stop(self) -> None:
        self._stopping = True
        workers, self.workers = self.workers, []
        for worker in workers:
            worker.stop()

    @property
    def alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def submit(self, name: str, *args: Any) -> Future[Any]:
        """Run an operation on the least busy worker."""
        alive = self.alive
        if not alive:
            future: Future[Any] = Future()
            future.set_exception(WorkerError("no worker process is running"))
            return future
        return min(alive, key=lambda w: w.load).call(name, args)

    def broadcast(self, name: str, *args: Any, timeout: float = BROADCAST_TIMEOUT) -> list[Any]:
        """Run an operation on every live worker and wait for all of them."""
        alive = self.alive
        if not alive:
            raise WorkerError("no worker process is running")
        futures = [w.call(name, args) for w in alive]
        done, late = wait(futures, timeout)
        if late:
            raise WorkerError(f"{len(late)} worker process(es) did not answer '{name}' within {timeout:g} s")
        return [f.result() for f in futures]

    def _event(self, kind: str, args: tuple[Any, ...]) -> None:
        if self.on_event is not None:
            self.on_event(kind, args)

    # -- the work the pipeline hands over ------------------------------------------------------

    def relabel(self, files: Sequence[Path], out: Path, plan: Mapping[str, str]) -> None:
        """Relabel ``files`` into ``out``, one slice per worker; the first failure is raised."""
        parts = max(1, min(len(self.alive) or 1, len(files)))
        slices = [[str(p) for p in files[i::parts]] for i in range(parts)]
        futures = [self.submit("relabel", part, str(out), dict(plan)) for part in slices]
        wait(futures)
        for future in futures:
            future.result()

    def retrieve(
        self,
        client: PacsClient,
        study_uid: str,
        directory: Path,
        *,
        series_uids: Sequence[str] | None = None,
        expected: int | None = None,
        receiver: StorageSCP | None = None,
    ) -> RetrieveResult:
        """``client.retrieve`` (C-GET) on a worker, holding one of the PACS's association slots."""
        receiver_config = receiver.config if receiver is not None else None
        staging = str(receiver.staging_root) if receiver is not None else None
        series = tuple(series_uids) if series_uids is not None else None
        with client.limiter.slot(client.config):
            future = self.submit("retrieve", client.config, receiver_config, staging, study_uid,
                                 str(directory), series, expected)
            try:
                return future.result()  # type: ignore[no-any-return]
            except WorkerError as exc:
                raise RetriablePacsError(f"the retrieval's worker process failed ({exc})",
                                         pacs=client.name) from exc
