"""Our C-MOVE destination as DCMTK's ``storescp``, run by the service (``receiver.engine: dcmtk``).

Why: receiving is where dqr-xnat spends most of its CPU. pynetdicom costs 4-5 ms of CPU per
instance (its state machine per PDU, data-set decoding), ``storescp`` about 0.3 ms, and with
``--fork`` every association is a process of its own, so concurrent C-MOVEs use every core. For
bulk pulls that is the difference (README, Benchmark).

What it trades (the README's configuration section says the same):

* ``storescp`` accepts any calling AE title and listens on every interface (DCMTK 3.6 has no
  listen-address option): ``receiver.host`` is not used, and the port must be firewalled so that
  only the PACS reach it.
* Instances are checked after they arrive instead of refused while arriving. Files of a study
  that is not being retrieved are deleted and counted (``refused_unexpected``), oversize ones are
  deleted and fail the study exactly as the pynetdicom receiver's refusals do, unreadable ones are
  deleted and counted once nothing has written to them for :data:`UNREADABLE_AFTER_SECONDS`.

How: ``storescp --bit-preserving`` streams every instance, byte for byte as the PACS sent it,
into one directory (``<staging>/storescp``). A C-MOVE's final response comes only after each of
its C-STORE requests was answered, and ``storescp`` answers after the file is written, so once
the final response is in, the study's files are complete: the study's receipt then reads three
UIDs from the header of each new file (once per file), moves the study's files into its
directory and records them (:meth:`DcmtkStorageSCP.collect`). Files of studies still in progress
are left where they are. After an attempt that failed (the PACS aborted, a timeout), the study's
files are deleted, since one may have been cut short while written: the retry asks for the whole
study (or the chosen series) again instead of only the short series.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dqr_xnat.adapters.pacs import Incoming, StorageSCP, StudyReceipt
from dqr_xnat.config import PacsConfig, ReceiverConfig
from dqr_xnat.errors import PacsError
from dqr_xnat.logs import phi_hash

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 10.0
ECHO_TIMEOUT_SECONDS = 3.0
STOP_TIMEOUT_SECONDS = 5.0
#: An unreadable file nobody has written to for this long is not an instance still arriving.
UNREADABLE_AFTER_SECONDS = 120.0
#: storescp's largest receive PDU: fewer, larger PDUs from the PACS.
MAX_PDU = 131072


class _CollectingReceipt(StudyReceipt):
    """A study's receipt whose instances are picked up from storescp's directory when waited for."""

    def __init__(self, scp: DcmtkStorageSCP, study_instance_uid: str, directory: Path, *, max_bytes: int) -> None:
        super().__init__(study_instance_uid, directory, max_bytes=max_bytes)
        self._scp = scp

    def wait_idle(self, done: Callable[[], bool], *, idle: float = 1.0) -> None:
        """Collect the study's files until ``done()``, or until ``idle`` seconds bring none."""
        last_arrival = time.monotonic()
        while True:
            if self._scp.collect(self):
                last_arrival = time.monotonic()
            if done() or time.monotonic() - last_arrival >= idle:
                return
            time.sleep(min(0.05, idle))


class DcmtkStorageSCP(StorageSCP):
    """:class:`StorageSCP` served by a ``storescp --fork`` process that this object starts and stops."""

    def __init__(self, config: ReceiverConfig, allowed: Iterable[PacsConfig], staging_root: Path) -> None:
        super().__init__(config, allowed, staging_root)
        if not config.port:
            raise ValueError("receiver.engine dcmtk needs a fixed receiver.port (storescp cannot report a chosen one)")
        self.incoming = self.staging_root / "storescp"
        self.log_path = self.staging_root.parent / "storescp.log"  # staging holds only instances
        self.pid_path = self.staging_root.parent / "storescp.pid"  # to stop one a killed service left
        self._process: subprocess.Popen[bytes] | None = None
        self._collect_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._headers: dict[str, Incoming] = {}  # file name in incoming -> its UIDs, read once

    @property
    def running(self) -> bool:
        """Started and not stopped (the process may have died since: see :attr:`alive`)."""
        return self._process is not None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def port(self) -> int:
        return self.config.port

    def problem(self) -> str | None:
        if not self.alive:
            return (f"storescp (receiver {self.ae_title}) is not running ({self._log_tail()}); "
                    "it is started again at the next retrieval")
        return None

    def start(self) -> DcmtkStorageSCP:
        with self._start_lock:  # concurrent retrievals may all find it dead: one restart
            if not self.alive:
                self._start()
        return self

    def _start(self) -> None:
        try:
            executable = dcmtk_executable(self.config.storescp)
        except PacsError as exc:
            raise PacsError(f"receiver.engine is dcmtk but {exc}, or set receiver.storescp to its path, "
                            "or use receiver.engine: pynetdicom") from None
        first = self._process is None  # not a restart while retrievals run
        if first:
            if self.config.host not in ("0.0.0.0", "::", ""):
                log.warning("receiver.host %s is not used by storescp, which listens on every interface: "
                            "firewall port %d so that only the PACS reach it", self.config.host, self.port)
            self._stop_orphan()
            self.incoming.mkdir(parents=True, exist_ok=True)
            self._discard_leftovers()
        else:
            _terminate(self._process)  # the children it forked may still hold the listening socket
        if _answers(self.port):  # whatever it is, it is not ours, and it would answer our checks
            raise PacsError(f"receiver.port {self.port} is already in use by another program; "
                            "stop it or choose another port (and register it at the PACS)")
        self._process = self._spawn(executable)
        self.pid_path.write_text(str(self._process.pid))
        try:
            self._wait_ready()
        except BaseException:
            _terminate(self._process)
            if first:
                self._process = None
            raise  # after a restart, still "running": the next retrieval tries again
        log.info("receiver %s: storescp listening on port %d", self.ae_title, self.port)

    def _spawn(self, executable: str) -> subprocess.Popen[bytes]:
        command = [
            executable, "--fork", "--aetitle", self.config.ae_title,
            "--output-directory", str(self.incoming),
            "--bit-preserving",  # the PACS's bytes, streamed to disk (never a whole instance in memory)
            "--accept-all", "--promiscuous",  # every transfer syntax and SOP class, like our own SCP
            "--disable-host-lookup", "--max-pdu", str(MAX_PDU), "--filename-extension", ".dcm",
            str(self.config.port),
        ]
        with open(self.log_path, "ab") as out:
            # TCP_NODELAY=1: without it DCMTK waits on delayed ACKs (pacs-notes §1); a session of
            # its own, so that stop() reaches the children --fork makes.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "TCP_NODELAY": "1"}, start_new_session=True)

    def _wait_ready(self) -> None:
        """Wait until storescp accepts connections, then check it answers a C-ECHO as our AE title."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if not self.alive:
                raise self._stopped_at_start()
            if _answers(self.port):
                break
            if time.monotonic() > deadline:
                raise PacsError(f"storescp (receiver {self.ae_title}) did not listen on port {self.port} "
                                f"within {START_TIMEOUT_SECONDS:g} s: {self._log_tail()}")
            time.sleep(0.02)
        ae = AE(ae_title=self.config.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_TIMEOUT_SECONDS
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.config.ae_title)
        if not assoc.is_established:
            if not self.alive:  # what answered the connection was someone else's server
                raise self._stopped_at_start()
            raise PacsError(f"storescp (receiver {self.ae_title}) on port {self.port} refused a C-ECHO "
                            f"association: {self._log_tail()}")
        assoc.release()

    def _stopped_at_start(self) -> PacsError:
        return PacsError(f"storescp (receiver {self.ae_title}) stopped at start: {self._log_tail()}; "
                         "check receiver.port (is it in use?) and receiver.ae_title")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " / ".join(lines[-3:]) or "no output"

    def stop(self) -> None:
        """Stop storescp and the children it forked (associations still open are cut)."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)
            self.pid_path.unlink(missing_ok=True)

    def _stop_orphan(self) -> None:
        """Stop the storescp a service killed with SIGKILL left running (it has a session of its own).

        Only a process that is storescp writing into our incoming directory: a pid is reused.
        """
        try:
            pid = int(self.pid_path.read_text())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            self.pid_path.unlink(missing_ok=True)
            return
        if str(self.incoming).encode() in command and any(p.endswith(b"storescp") for p in command):
            log.warning("receiver %s: stopping storescp (pid %d) left running by a previous run", self.ae_title, pid)
            _stop_session(pid)
        self.pid_path.unlink(missing_ok=True)

    @contextmanager
    def expect(self, study_instance_uid: str, directory: Path) -> Iterator[StudyReceipt]:
        """As :meth:`StorageSCP.expect`; restarts storescp first if it died."""
        with self._start_lock:  # also waits for a restart another retrieval is making
            if self.running and not self.alive:
                log.error("receiver %s: storescp is not running (%s); starting it again",
                          self.ae_title, self._log_tail())
                self._start()
        with super().expect(study_instance_uid, directory) as receipt:
            try:
                yield receipt
            finally:  # what was not collected came from an attempt that failed: not to be trusted
                self._sweep(study_instance_uid, None)

    def _new_receipt(self, study_instance_uid: str, directory: Path) -> StudyReceipt:
        return _CollectingReceipt(self, study_instance_uid, directory,
                                  max_bytes=self.config.max_instance_mb * 2**20)

    def collect(self, receipt: StudyReceipt) -> int:
        """Move the files of ``receipt``'s study into place; delete those no study expects.

        Returns how many files of the study were found. Call it only when the study's files are
        complete (after the C-MOVE's final response), since a file is moved as it is.
        """
        return self._sweep(receipt.study_instance_uid, receipt)

    def _sweep(self, study_instance_uid: str, receipt: StudyReceipt | None) -> int:
        """Hand the study's files to ``receipt`` (or delete them if None) and delete unexpected ones."""
        found = 0
        with self._collect_lock:
            seen: set[str] = set()
            for entry in os.scandir(self.incoming):
                if not entry.is_file(follow_symlinks=False):
                    continue
                seen.add(entry.name)
                try:
                    item = self._header(entry)
                except FileNotFoundError:  # storescp replaced it under us: the next sweep reads it
                    continue
                if item is None:
                    continue
                if item.study_instance_uid == study_instance_uid:
                    del self._headers[entry.name]
                    found += 1
                    if receipt is not None:
                        receipt.accept(item)
                    else:
                        item.discard()
                elif self._receipt_for(item.study_instance_uid) is None:  # counts it as refused
                    del self._headers[entry.name]
                    item.discard()
                    log.warning("receiver %s: deleted an instance of study %s: not a study being retrieved",
                                self.ae_title, phi_hash(item.study_instance_uid))
            for name in self._headers.keys() - seen:
                del self._headers[name]
        return found

    def _header(self, entry: os.DirEntry[str]) -> Incoming | None:
        """The file's UIDs (cached); None while it may still be arriving; an old unreadable file is deleted."""
        item = self._headers.get(entry.name)
        if item is not None:
            item.size = entry.stat().st_size
            return item
        path = Path(entry.path)
        try:
            item = Incoming.read(path, owned=True)
            if not (item.study_instance_uid and item.sop_instance_uid):
                raise InvalidDicomError("no StudyInstanceUID or SOPInstanceUID (yet)")
        except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError, EOFError) as exc:
            if time.time() - entry.stat().st_mtime > UNREADABLE_AFTER_SECONDS:
                path.unlink(missing_ok=True)
                self._on_unreadable()
                log.warning("receiver %s: deleted an unreadable file (%s)", self.ae_title, type(exc).__name__)
            return None
        self._headers[entry.name] = item
        return item

    def _discard_leftovers(self) -> None:
        """Files a previous run left in the incoming directory belong to no retrieval now."""
        for entry in os.scandir(self.incoming):
            if entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
        self._headers.clear()


def dcmtk_executable(name: str) -> str:
    """The DCMTK program ``name`` (a path, or a name looked up on PATH), skipping scripts.

    pynetdicom installs Python apps with DCMTK's names (``storescp``, ...) beside the Python it is
    installed for, which is often first on PATH (a virtualenv, ``/usr/local/bin`` in the Docker
    image): those take other options, and cost the CPU this engine exists to save.
    """
    if os.sep in name:
        candidates = [Path(name)]
    else:
        candidates = [Path(folder) / name for folder in os.environ.get("PATH", os.defpath).split(os.pathsep) if folder]
    scripts = []
    for path in candidates:
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        with open(path, "rb") as fh:
            if fh.read(2) != b"#!":
                return str(path)
        scripts.append(str(path))
    found = f" ({', '.join(scripts)} is a script, not DCMTK's program)" if scripts else ""
    raise PacsError(f"DCMTK's '{name}' was not found{found}: install DCMTK (Debian: apt-get install dcmtk)")


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, to storescp's whole session: its --fork children outlive it otherwise."""
    _stop_session(process.pid, process.wait)


def _stop_session(pid: int, wait: Callable[[float], object] | None = None) -> None:
    """SIGTERM, then SIGKILL, to the process group ``pid`` leads; ``wait`` reaps our own child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return  # nobody left in the session
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        if wait is not None:
            try:
                wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                continue
        else:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)


def _answers(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
