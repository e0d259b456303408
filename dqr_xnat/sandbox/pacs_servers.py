"""Start real PACS servers on loopback: Orthanc, DCMTK dcmqrscp and pynetdicom's qrscp app.

Why three: PACS differ (statuses, matching rules, keys they ignore), and the service must give the
same answer on all of them, so tests, the demo and benchmarks run against real servers, never a
hand-made fake. Each launcher writes a config into ``workdir``, starts the server on free
127.0.0.1 ports as its own process group, waits until it really answers DICOM (and HTTP for
Orthanc), and returns a :class:`RunningPacs` handle. A server that cannot start raises
:class:`PacsServerError` with the tail of its log; nothing is ever skipped.

Every DCMTK-based process (Orthanc, dcmqrscp, dcmqridx) runs with ``TCP_NODELAY=1`` (otherwise each
DIMSE exchange waits on a 40 ms delayed ACK); our own pynetdicom sockets set TCP_NODELAY from an
``EVT_CONN_OPEN`` handler. pynetdicom's qrscp app cannot be given that handler, see below.

``destinations`` maps a C-MOVE destination AE title to ``(host, port)``. ``allowed_peers`` (Orthanc
and dcmqrscp) restricts which calling AE titles may associate: ``None`` accepts anyone, a list
accepts only those (plus, on Orthanc, the destinations, which it treats as known modalities), and
an empty list gives "a PACS configured to refuse us". Orthanc then rejects the association;
dcmqrscp sends the reject and closes at once, so a pynetdicom requestor sees it as rejected about
3 times in 4 and as aborted otherwise (DCMTK's echoscu always sees the reject).

What each PACS supports, as measured with the default ``testdata`` catalog (Study Root, plain
pynetdicom SCU; pinned by tests/adapters/test_pacs_servers.py, more in pacs-notes.md §2).
Columns: Orthanc 1.10 | dcmqrscp 3.6.7 | qrscp (pynetdicom 3.0)::

    study-level answers per study      1               | 1                | 1 PER INSTANCE
    PatientName exact match            case-insens.    | case-sensitive   | case-sensitive
    PatientName wildcard (DOE*)        case-insens.    | case-sensitive   | ASCII case-insens.
    PatientBirthDate                   match + return  | match + return   | IGNORED, not returned
    ModalitiesInStudy                  match + return  | ignored, empty   | IGNORED, not returned
    NumberOfStudyRelatedInstances      returned        | not returned     | not returned
    StudyDescription                   returned        | returned         | not returned
    backslash list, non-UID key        union           | 0 matches        | failure 0xC320
    backslash list of UIDs             union           | union            | failure 0xC320
    SERIES level SeriesDescription     returned        | not returned     | not returned
    SERIES level Modality=SR           matched         | matched          | matched (1 per instance)
    IMAGE level SOPClassUID            returned        | not returned     | not returned
    C-MOVE, unknown destination        0xC000          | 0xA801           | 0xA801
    C-MOVE, destination not listening  0xC000, 0 done  | 0xA702, failed=N | 0xA801
    C-MOVE speed (loopback, 64x64)     ~7 ms/inst      | ~7 ms/inst       | ~21 ms/inst (58: Nagle)
    load() speed                       ~3 ms/inst REST | <1 ms/inst index | ~22 ms/inst

qrscp indexes only PatientID, PatientName, StudyInstanceUID, StudyDate, StudyTime, AccessionNumber,
StudyID, SeriesInstanceUID, Modality, SeriesNumber, SOPInstanceUID and InstanceNumber; it silently
drops every other key from the query *and* from the answer. It is the example of a PACS that
ignores what it does not index. A non-ASCII PatientName matches on all three when the query
carries ``SpecificCharacterSet = ISO_IR 192``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydicom.filereader import read_file_meta_info

from dqr_xnat.errors import DqrError

HOST = "127.0.0.1"
PacsKind = Literal["orthanc", "dcmqrscp", "qrscp"]
Destinations = Mapping[str, tuple[str, int]]
NO_DESTINATIONS: Destinations = MappingProxyType({})

#: Calling AE title of the readiness probe and of the loaders.
PROBE_AE = "DQRSANDBOX"
START_TIMEOUT = 30.0
_BIND_ERRORS = (
    "address already in use",
    "cannot bind",
    "bind failed",
    "could not bind",
    "errno 98",
)


class PacsServerError(DqrError, RuntimeError):
    """A sandbox PACS could not be started, loaded or stopped; the message says why."""


def free_port() -> int:
    """A loopback port nobody uses, held back from other processes' port-0 binds for ~60 s.

    Binding port 0 alone leaves a race: another process (another pytest worker) may get the same
    port before our server binds it. Here the port is left in TIME_WAIT, so the kernel will not hand
    it out to port-0 binds, while servers that set SO_REUSEADDR (all three PACS do) can bind it.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(1)
        address = listener.getsockname()
        with socket.create_connection(address) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the accepting side closes first, so it keeps the TIME_WAIT
            del client
        return int(address[1])


# --------------------------------------------------------------------------------------------
# The handle


@dataclass
class RunningPacs:
    """A started PACS. Use as a context manager, or call :meth:`stop`."""

    kind: PacsKind
    host: str
    port: int
    ae_title: str
    workdir: Path
    process: subprocess.Popen[bytes]
    http_url: str | None = None
    command: list[str] = field(default_factory=list, repr=False)
    log_path: Path = field(default=Path(), repr=False)
    _loader: Callable[[RunningPacs, list[Path]], None] | None = field(default=None, repr=False)

    def __enter__(self) -> RunningPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def load(self, files: Iterable[Path]) -> None:
        """Put these Part-10 files into the PACS, the way each server takes data in."""
        paths = [Path(f) for f in files]
        if paths and self._loader is not None:
            self._loader(self, paths)

    def echo(self) -> bool:
        """True when the server accepts an association and answers C-ECHO with success."""
        return _probe(self.host, self.port, self.ae_title) == "echo"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout`` seconds."""
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group at once (dcmqrscp's per-association children too).

        For fault tests: a PACS that dies mid-transfer. Data already stored survives a restart.
        """
        _signal_group(self.process, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def restart(self) -> None:
        """Start the same server again on the same ports with the same data; wait until ready."""
        if self.running:
            self.kill()
        with self.log_path.open("a") as log:
            log.write(f"--- dqr-xnat sandbox: restarting {self.kind} ---\n")
        self.process = _spawn(self.command, self.workdir, self.log_path)
        _wait_ready(self)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)  # reap forked children of a parent already gone
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


# --------------------------------------------------------------------------------------------
# Orthanc


def start_orthanc(
    workdir: Path,
    *,
    ae_title: str = "ORTHANC",
    destinations: Destinations = NO_DESTINATIONS,
    allowed_peers: Iterable[str] | None = None,
    extra_config: Mapping[str, object] = MappingProxyType({}),
    executable: str = "Orthanc",
) -> RunningPacs:
    """Orthanc with a throwaway database in ``workdir`` (pacs-notes §2); never reads /etc/orthanc.

    ``extra_config`` keys replace generated ones wholesale (``DicomModalities`` too, which drops
    ``destinations``); one merged JSON file, because Orthanc refuses keys defined twice in a
    config directory.
    """
    workdir = _prepare(workdir)
    peers = None if allowed_peers is None else list(allowed_peers)

    def build() -> tuple[list[str], int, str]:
        port, http = free_port(), free_port()
        config = _orthanc_config(workdir, ae_title, port, http, destinations, peers)
        config.update(extra_config)
        path = workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return (
            [_which(executable, _INSTALL.format("orthanc")), str(path)],
            port,
            f"http://{HOST}:{http}",
        )

    return _start("orthanc", workdir, ae_title, build, _load_orthanc)


def _orthanc_config(
    workdir: Path,
    ae_title: str,
    port: int,
    http: int,
    destinations: Destinations,
    peers: list[str] | None,
) -> dict[str, object]:
    allow_all = peers is None
    modalities = {aet: [aet, host, p] for aet, (host, p) in destinations.items()}
    for peer in peers or ():
        modalities.setdefault(peer, [peer, HOST, 104])  # only the AE title identifies a peer
    db = str(workdir / "db")
    return {
        "Name": f"dqr-sandbox-{ae_title}",
        "StorageDirectory": db,
        "IndexDirectory": db,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowEcho": allow_all,
        "DicomAlwaysAllowStore": allow_all,
        "DicomAlwaysAllowFind": allow_all,
        "DicomAlwaysAllowGet": allow_all,
        "DicomAlwaysAllowMove": allow_all,
        "DicomModalities": modalities,
        "DicomModalitiesInDatabase": False,
        "DicomScuTimeout": 30,
        "DicomScpTimeout": 30,
        "DicomThreadsCount": 4,
        "SynchronousCMove": True,
        "StorageAccessOnFind": "Always",
        "SyncStorageArea": False,
        "StorageCompression": False,
        "OverwriteInstances": True,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "StableAge": 60,
        "MetricsEnabled": False,
        "HttpCompressionEnabled": False,
        "DefaultEncoding": "Utf8",
        "SaveJobs": False,
    }


def _load_orthanc(pacs: RunningPacs, files: list[Path]) -> None:
    """REST ``POST /instances``, one file at a time, streamed from disk."""
    import requests

    assert pacs.http_url is not None
    with requests.Session() as http:
        for path in files:
            with path.open("rb") as stream:
                reply = http.post(
                    f"{pacs.http_url}/instances",
                    data=stream,
                    headers={"Content-Type": "application/dicom"},
                    timeout=60,
                )
            status = reply.json().get("Status") if reply.ok else None
            if status not in ("Success", "AlreadyStored"):
                raise PacsServerError(
                    f"Orthanc refused {path}: HTTP {reply.status_code} {reply.text[:300]}"
                )


# --------------------------------------------------------------------------------------------
# dcmqrscp


def start_dcmqrscp(
    workdir: Path,
    *,
    ae_title: str = "DCMQRSCP",
    destinations: Destinations = NO_DESTINATIONS,
    allowed_peers: Iterable[str] | None = None,
    executable: str = "dcmqrscp",
) -> RunningPacs:
    """DCMTK dcmqrscp in its default fork mode (``--single-process`` segfaults, pacs-notes §4)."""
    workdir = _prepare(workdir)
    (workdir / "db").mkdir(exist_ok=True)
    peers = None if allowed_peers is None else list(allowed_peers)

    def build() -> tuple[list[str], int, None]:
        port = free_port()
        path = workdir / "dcmqrscp.cfg"
        path.write_text(_dcmqrscp_config(workdir / "db", ae_title, port, destinations, peers))
        return [_which(executable, _INSTALL.format("dcmtk")), "-c", str(path)], port, None

    return _start("dcmqrscp", workdir, ae_title, build, _load_dcmqrscp)


def _dcmqrscp_config(
    db: Path, ae_title: str, port: int, destinations: Destinations, peers: list[str] | None
) -> str:
    hosts = [
        f"dest{i} = ({aet}, {host}, {p})" for i, (aet, (host, p)) in enumerate(destinations.items())
    ]
    if peers is None:
        peer_list = "ANY"
    else:
        # dcmqrscp matches AE title *and* the peer's reverse-resolved host name ("localhost"
        # here), so list both spellings; an AE that never calls stands in for an empty list.
        names = []
        for i, aet in enumerate(peers or ["NOBODY"]):
            for j, host in enumerate(("localhost", HOST)):
                names.append(f"peer{i}x{j}")
                hosts.append(f"{names[-1]} = ({aet}, {host}, 104)")
        hosts.append(f"allowed = {', '.join(names)}")
        peer_list = "allowed"
    # quota (maxStudies <= 500, maxBytesPerStudy): exceeding it DELETES the oldest studies.
    return "\n".join(
        [
            f"NetworkTCPPort = {port}",
            "MaxPDUSize = 65536",
            "MaxAssociations = 16",
            "",
            "HostTable BEGIN",
            *hosts,
            "HostTable END",
            "",
            "VendorTable BEGIN",
            "VendorTable END",
            "",
            "AETable BEGIN",
            f"{ae_title} {db} RW (500, 1024mb) {peer_list}",
            "AETable END",
            "",
        ]
    )


def _load_dcmqrscp(pacs: RunningPacs, files: list[Path]) -> None:
    """Copy into the storage area and index with ``dcmqridx`` (works whoever may call it)."""
    db = pacs.workdir / "db"
    start = len(list(db.glob("IMG*.dcm")))
    copies = []
    for n, path in enumerate(files, start=start):
        target = db / f"IMG{n:07d}.dcm"
        shutil.copyfile(path, target)
        copies.append(str(target))
    indexer = _which("dcmqridx", _INSTALL.format("dcmtk"))
    for i in range(0, len(copies), 500):
        done = subprocess.run(
            [indexer, str(db), *copies[i : i + 500]],
            env=_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise PacsServerError(f"dcmqridx failed ({done.returncode}): {done.stderr[-2000:]}")


# --------------------------------------------------------------------------------------------
# pynetdicom qrscp


def start_qrscp(
    workdir: Path,
    *,
    ae_title: str = "QRSCP",
    destinations: Destinations = NO_DESTINATIONS,
    python: str = sys.executable,
    nodelay: bool = True,
) -> RunningPacs:
    """pynetdicom's qrscp app with its SQLite index and files in ``workdir``.

    ``nodelay=False`` runs the app exactly as shipped (``python -m pynetdicom qrscp -c FILE``);
    its sockets then keep Nagle on and a C-MOVE takes ~2.7x as long (58 against 21 ms per
    instance). The default runs the same app through :func:`run_qrscp_nodelay`. It needs SQLAlchemy
    in ``python``'s environment (a dependency of this project).
    """
    workdir = _prepare(workdir)
    module = ["dqr_xnat.sandbox.pacs_servers"] if nodelay else ["pynetdicom"]

    def build() -> tuple[list[str], int, None]:
        port = free_port()
        path = workdir / "qrscp.ini"
        path.write_text(_qrscp_config(workdir, ae_title, port, destinations))
        return (
            [
                _which(python, "pass an existing Python with pynetdicom and SQLAlchemy"),
                "-m",
                *module,
                "qrscp",
                "-c",
                str(path),
            ],
            port,
            None,
        )

    return _start("qrscp", workdir, ae_title, build, _load_by_c_store)


def run_qrscp_nodelay(argv: list[str]) -> None:
    """Run pynetdicom's qrscp app unchanged except that every socket it opens sets TCP_NODELAY.

    The app builds its AE from the module global ``AE``; a subclass that adds our EVT_CONN_OPEN
    handler to ``associate`` (C-MOVE sub-associations) and ``start_server`` (incoming) is all it
    takes, through pynetdicom's public event API.
    """
    from pynetdicom import AE, evt
    from pynetdicom.apps.qrscp import qrscp as app

    handler = (evt.EVT_CONN_OPEN, nodelay)

    class NoDelayAE(AE):
        def associate(self, addr: str, port: int, **kw: Any) -> Any:  # type: ignore[override]
            kw["evt_handlers"] = [*(kw.get("evt_handlers") or []), handler]
            return super().associate(addr, port, **kw)

        def start_server(self, address: Any, **kw: Any) -> Any:  # type: ignore[override]
            kw["evt_handlers"] = [*(kw.get("evt_handlers") or []), handler]
            return super().start_server(address, **kw)

    setattr(app, "AE", NoDelayAE)  # noqa: B010 - the app looks the name up when it builds its AE
    app.main(argv)  # type: ignore[no-untyped-call]


def _qrscp_config(workdir: Path, ae_title: str, port: int, destinations: Destinations) -> str:
    lines = [
        "[DEFAULT]",
        f"ae_title: {ae_title}",
        f"port: {port}",
        "max_pdu: 0",
        "acse_timeout: 30",
        "dimse_timeout: 60",
        "network_timeout: 60",
        f"bind_address: {HOST}",
        f"instance_location: {workdir / 'instances'}",
        f"database_location: {workdir / 'instances.sqlite'}",
        "log_identifier: False",
        "",
    ]
    for aet, (host, p) in destinations.items():
        lines += [f"[{aet}]", f"address: {host}", f"port: {p}", ""]
    return "\n".join(lines)


def _load_by_c_store(pacs: RunningPacs, files: list[Path]) -> None:
    """C-STORE every file over one association per 100 files (contexts are negotiated per batch)."""
    for i in range(0, len(files), 100):
        _store_batch(pacs, files[i : i + 100])


def _store_batch(pacs: RunningPacs, files: list[Path]) -> None:
    from pynetdicom import AE, evt

    contexts: dict[str, set[str]] = {}
    for path in files:
        meta = read_file_meta_info(path)
        contexts.setdefault(meta.MediaStorageSOPClassUID, set()).add(meta.TransferSyntaxUID)
    ae = AE(ae_title=PROBE_AE)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(
        pacs.host, pacs.port, ae_title=pacs.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
    )
    if not assoc.is_established:
        raise PacsServerError(f"{pacs.kind} at {pacs.host}:{pacs.port} refused the loader")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0x0000:
                code = f"0x{status.Status:04X}" if status else "no answer"
                raise PacsServerError(f"{pacs.kind} refused {path}: C-STORE {code}")
    finally:
        assoc.release()


# --------------------------------------------------------------------------------------------
# Shared start-up machinery


def nodelay(event: object) -> None:
    """EVT_CONN_OPEN handler: disable Nagle on a pynetdicom socket (pacs-notes §3)."""
    sock = event.assoc.dul.socket.socket  # type: ignore[attr-defined]
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _prepare(workdir: Path) -> Path:
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _which(executable: str, remedy: str) -> str:
    found = shutil.which(executable)
    if found is None:
        raise PacsServerError(f"'{executable}' not found on PATH: {remedy}")
    return found


_INSTALL = "install it (Debian: apt-get install {}; `make setup` does it)"


def _spawn(command: list[str], workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start in its own session so that stop/kill reach every child (dcmqrscp forks)."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )


def _start(
    kind: PacsKind,
    workdir: Path,
    ae_title: str,
    build: Callable[[], tuple[list[str], int, str | None]],
    loader: Callable[[RunningPacs, list[Path]], None],
) -> RunningPacs:
    """Spawn, wait until ready; once more on fresh ports if the first try lost a port race."""
    for attempt in (1, 2):
        command, port, http_url = build()
        log_path = workdir / f"{kind}.log"
        with log_path.open("w" if attempt == 1 else "a") as log:
            log.write(f"--- dqr-xnat sandbox: starting {kind} (attempt {attempt}) ---\n")
        pacs = RunningPacs(
            kind=kind,
            host=HOST,
            port=port,
            ae_title=ae_title,
            workdir=workdir,
            process=_spawn(command, workdir, log_path),
            http_url=http_url,
            command=command,
            log_path=log_path,
            _loader=loader,
        )
        try:
            _wait_ready(pacs)
            return pacs
        except PacsServerError:
            pacs.kill()
            lost_race = any(e in pacs.log_tail().lower() for e in _BIND_ERRORS)
            if attempt == 2 or not lost_race:
                raise
    raise AssertionError("unreachable")


def _wait_ready(pacs: RunningPacs, timeout: float = START_TIMEOUT) -> None:
    """Poll until the server answers HTTP (Orthanc) and DICOM; fail with its log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if not pacs.running:
            raise PacsServerError(
                f"{pacs.kind} exited with code {pacs.process.returncode} while starting "
                f"({' '.join(pacs.command)}); log {pacs.log_path}:\n{pacs.log_tail()}"
            )
        if _http_ready(pacs.http_url) and _probe(pacs.host, pacs.port, pacs.ae_title) != "down":
            time.sleep(0.05)
            if pacs.running:  # else whoever won a port race answered, not our server
                return
            continue
        if time.monotonic() > deadline:
            pacs.kill()
            raise PacsServerError(
                f"{pacs.kind} did not answer on {pacs.host}:{pacs.port} within {timeout:.0f} s; "
                f"log {pacs.log_path}:\n{pacs.log_tail()}"
            )
        time.sleep(0.05)


def _http_ready(url: str | None) -> bool:
    if url is None:
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/system", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _probe(host: str, port: int, ae_title: str) -> Literal["echo", "rejected", "down"]:
    """C-ECHO; "rejected" still means the server is up (it answered the association)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return "down"
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=PROBE_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if assoc.is_rejected:
        return "rejected"
    if not assoc.is_established:
        return "down"
    try:
        status = assoc.send_c_echo()
        return "echo" if status and status.Status == 0x0000 else "rejected"
    finally:
        assoc.release()


if __name__ == "__main__":
    if sys.argv[1:2] != ["qrscp"]:
        sys.exit("usage: python -m dqr_xnat.sandbox.pacs_servers qrscp -c FILE.ini")
    run_qrscp_nodelay(sys.argv[2:])
