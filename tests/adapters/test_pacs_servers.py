"""The sandbox PACS really run, hold the synthetic catalog, retrieve it, and fail loudly.

Everything here talks plain pynetdicom to the servers (not the project's adapter), so that a bug in
the adapter can never hide a broken fixture. The capability matrix pins what each PACS does with
the query keys the CSV language offers; pacs_servers' docstring summarises it.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)
from pynetdicom.sop_class import (
    Verification,
)

from dqr_xnat.sandbox import pacs_servers
from dqr_xnat.sandbox.pacs_servers import (
    HOST,
    PacsServerError,
    RunningPacs,
    nodelay,
    start_dcmqrscp,
    start_orthanc,
    start_qrscp,
)
from dqr_xnat.sandbox.testdata import SyntheticStudy, find

CALLING_AE = "PYTESTSCU"
MakePacs = Callable[..., RunningPacs]


def _associate(pacs: RunningPacs, context: str, calling: str = CALLING_AE) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate(
        pacs.host, pacs.port, ae_title=pacs.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
    )


def c_find(
    pacs: RunningPacs, keys: dict[str, str], level: str = "STUDY", charset: str | None = None
) -> list[Dataset] | int:
    """Identifiers of the pending answers, or the failure status."""
    query = Dataset()
    if charset:
        query.SpecificCharacterSet = charset
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = _associate(pacs, FIND)
    assert assoc.is_established
    answers = []
    try:
        for status, identifier in assoc.send_c_find(query, FIND):
            assert status, f"no C-FIND response; {pacs.kind} log:\n{pacs.log_tail()}"
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
            elif status.Status == 0x0000:
                return answers
            else:
                return int(status.Status)
    finally:
        assoc.release()
    raise AssertionError("C-FIND ended without a final status")


STUDY_KEYS = {
    "StudyInstanceUID": "",
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "AccessionNumber": "",
    "StudyDate": "",
    "StudyID": "",
    "StudyDescription": "",
    "ModalitiesInStudy": "",
    "NumberOfStudyRelatedInstances": "",
}


class StoreSCP:
    """A tiny storage SCP, the C-MOVE destination: records each SOPInstanceUID it receives."""

    def __init__(self, ae_title: str, port: int) -> None:
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, AllTransferSyntaxes)
        self.server = ae.start_server(
            (HOST, port),
            block=False,
            evt_handlers=[(evt.EVT_CONN_OPEN, nodelay), (evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            self.received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000


@pytest.fixture
def receiver(pacs_receiver_ae: str, pacs_receiver_port: int) -> Iterator[StoreSCP]:
    scp = StoreSCP(pacs_receiver_ae, pacs_receiver_port)
    yield scp
    scp.server.shutdown()


def c_move(pacs: RunningPacs, destination: str, study_uid: str) -> Dataset:
    """The final C-MOVE response."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(pacs, MOVE)
    assert assoc.is_established
    try:
        for status, _ in assoc.send_c_move(query, destination, MOVE):
            assert status, f"no C-MOVE response; {pacs.kind} log:\n{pacs.log_tail()}"
            if status.Status != 0xFF00:
                return status
    finally:
        assoc.release()
    raise AssertionError("C-MOVE ended without a final status")


# --------------------------------------------------------------------------------------------
# Every PACS: up, loaded with exactly the catalog, retrieves


def test_answers_c_echo(any_pacs: RunningPacs) -> None:
    assert any_pacs.echo()
    assoc = _associate(any_pacs, Verification)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_holds_exactly_the_catalog_studies(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    answers = c_find(any_pacs, {"StudyInstanceUID": "", "AccessionNumber": ""})
    assert isinstance(answers, list)
    assert {a.StudyInstanceUID for a in answers} == {s.study_uid for s in synthetic_catalog}


def test_holds_exactly_the_catalog_instances(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    keys = {"StudyInstanceUID": "", "SeriesInstanceUID": "", "SOPInstanceUID": ""}
    answers = c_find(any_pacs, keys, level="IMAGE")
    assert isinstance(answers, list)
    held: dict[str, set[str]] = defaultdict(set)
    for answer in answers:
        held[answer.StudyInstanceUID].add(answer.SOPInstanceUID)
    assert len(answers) == sum(s.instances for s in synthetic_catalog) == 265
    assert held == {s.study_uid: set(s.sop_instance_uids()) for s in synthetic_catalog}


def test_study_attributes_come_back_as_written(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    answers = c_find(any_pacs, dict(STUDY_KEYS), charset="ISO_IR 192")
    assert isinstance(answers, list)
    by_uid = {a.StudyInstanceUID: a for a in answers}
    for study in synthetic_catalog:
        answer = by_uid[study.study_uid]
        assert str(answer.PatientName) == study.patient_name
        assert answer.PatientID == study.patient_id
        assert (answer.AccessionNumber or "") == study.accession
        assert (answer.StudyID or "") == study.study_id
        assert answer.StudyDate == study.study_date


def test_c_move_delivers_every_instance_of_a_study(
    any_pacs: RunningPacs,
    synthetic_catalog: list[SyntheticStudy],
    receiver: StoreSCP,
    pacs_receiver_ae: str,
) -> None:
    study = find(synthetic_catalog, accession="ACC0201")[0]  # CT + PT + a Secondary Capture
    final = c_move(any_pacs, pacs_receiver_ae, study.study_uid)
    assert final.Status == 0x0000
    assert sorted(receiver.received) == sorted(study.sop_instance_uids())
    assert len(receiver.received) == study.instances == 41


def test_c_move_of_a_dose_sr_study(
    any_pacs: RunningPacs,
    synthetic_catalog: list[SyntheticStudy],
    receiver: StoreSCP,
    pacs_receiver_ae: str,
) -> None:
    study = find(synthetic_catalog, accession="ACC0601")[0]  # CT + X-Ray Radiation Dose SR
    assert c_move(any_pacs, pacs_receiver_ae, study.study_uid).Status == 0x0000
    assert sorted(receiver.received) == sorted(study.sop_instance_uids())


# --------------------------------------------------------------------------------------------
# What each PACS does with each kind of query: the differences the PACS adapter must paper over.
# (id, query keys, studies returned by (orthanc, dcmqrscp, qrscp)); "fail" = a failure status.
MATRIX: list[tuple[str, dict[str, str], tuple[int | str, int | str, int | str]]] = [
    ("universal", {}, (9, 9, 9)),
    ("accession wildcard", {"AccessionNumber": "ACC01*"}, (2, 2, 2)),
    ("accession wrong case", {"AccessionNumber": "acc0101"}, (0, 0, 0)),
    ("accession list", {"AccessionNumber": "ACC0101\\ACC0201"}, (2, 0, "fail")),
    ("name wildcard upper", {"PatientName": "DOE*"}, (4, 3, 4)),
    ("name exact lower", {"PatientName": "doe^john"}, (2, 0, 0)),
    ("name list", {"PatientName": "DOE^JOHN\\SMITH^ALICE"}, (3, 0, 0)),
    ("birth date range", {"PatientBirthDate": "19600101-19611231"}, (3, 3, 9)),
    ("study date exact", {"StudyDate": "20230110"}, (2, 2, 2)),
    ("study date open start", {"StudyDate": "-19991231"}, (1, 1, 1)),
    ("study date leap day on", {"StudyDate": "20240229-"}, (2, 2, 2)),
    ("study date list", {"StudyDate": "20230110\\20221231"}, (3, 0, "fail")),
    ("modality MR", {"ModalitiesInStudy": "MR"}, (3, 9, 9)),
    ("UID list", {"StudyInstanceUID": "UID0\\UID1"}, (2, 2, "fail")),
    ("patient ID list", {"PatientID": "PID0001\\PID0002"}, (3, 0, "fail")),
]


@pytest.mark.parametrize(("query", "expected"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_capability_matrix(
    any_pacs: RunningPacs,
    synthetic_catalog: list[SyntheticStudy],
    query: dict[str, str],
    expected: tuple[int | str, int | str, int | str],
) -> None:
    if query.get("StudyInstanceUID") == "UID0\\UID1":
        query = {"StudyInstanceUID": "\\".join(s.study_uid for s in synthetic_catalog[:2])}
    answers = c_find(any_pacs, {**STUDY_KEYS, **query})
    got = "fail" if isinstance(answers, int) else len({a.StudyInstanceUID for a in answers})
    assert got == expected[("orthanc", "dcmqrscp", "qrscp").index(any_pacs.kind)]


def test_non_ascii_name_matches_with_utf8_charset(any_pacs: RunningPacs) -> None:
    answers = c_find(any_pacs, {**STUDY_KEYS, "PatientName": "MÜLLER^HANS"}, charset="ISO_IR 192")
    assert isinstance(answers, list)
    assert {str(a.PatientName) for a in answers} == {"MÜLLER^HANS"}
    assert len({a.StudyInstanceUID for a in answers}) == 2


def test_what_each_pacs_returns_at_study_level(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    study = find(synthetic_catalog, accession="ACC0101")[0]
    answers = c_find(any_pacs, {**STUDY_KEYS, "StudyInstanceUID": study.study_uid})
    assert isinstance(answers, list)
    first = answers[0]
    returned = {k for k in STUDY_KEYS if first.get(k) not in (None, "")}
    always = {
        "StudyInstanceUID",
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyID",
    }
    expected = {
        "orthanc": always | {"PatientBirthDate", "StudyDescription", "ModalitiesInStudy",
                             "NumberOfStudyRelatedInstances"},
        "dcmqrscp": always | {"PatientBirthDate", "StudyDescription"},
        "qrscp": always,
    }  # fmt: skip
    assert returned == expected[any_pacs.kind]
    # qrscp answers once per instance, the others once per study
    assert len(answers) == (study.instances if any_pacs.kind == "qrscp" else 1)
    if any_pacs.kind == "orthanc":
        assert list(first.ModalitiesInStudy) == ["CT", "SR"]
        assert int(first.NumberOfStudyRelatedInstances) == study.instances


def test_series_level_answers(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    study = find(synthetic_catalog, accession="ACC0101")[0]
    keys = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": "", "SeriesNumber": "",
            "Modality": "", "SeriesDescription": ""}  # fmt: skip
    answers = c_find(any_pacs, keys, level="SERIES")
    assert isinstance(answers, list)
    assert {(a.SeriesInstanceUID, a.Modality) for a in answers} == {
        (s.uid, s.modality) for s in study.series
    }
    descriptions = {a.get("SeriesDescription") for a in answers}
    if any_pacs.kind == "orthanc":
        assert descriptions == {s.description for s in study.series}
    else:
        assert descriptions == {None}  # neither dcmqrscp nor qrscp returns SeriesDescription
    only_sr = c_find(any_pacs, {**keys, "Modality": "SR"}, level="SERIES")
    assert isinstance(only_sr, list)
    assert {a.SeriesInstanceUID for a in only_sr} == {study.series[-1].uid}


def test_unknown_move_destination_status(
    any_pacs: RunningPacs, synthetic_catalog: list[SyntheticStudy]
) -> None:
    final = c_move(any_pacs, "NOSUCHAE", synthetic_catalog[0].study_uid)
    assert final.Status == {"orthanc": 0xC000, "dcmqrscp": 0xA801, "qrscp": 0xA801}[any_pacs.kind]


# --------------------------------------------------------------------------------------------
# Refusing configurations, faults, start-up errors


def _refused(assoc: Association) -> bool:
    """Refused by the PACS: a reject, or (dcmqrscp, ~1 time in 4) a connection it drops.

    dcmqrscp sends A-ASSOCIATE-RJ and closes at once; when pynetdicom's reactor has not read the
    reject before the close arrives, the association ends as aborted. DCMTK's echoscu always sees
    the reject. Either way nothing is established, which is what a client must handle.
    """
    return not assoc.is_established and (assoc.is_rejected or assoc.is_aborted)


@pytest.mark.parametrize("kind", ["orthanc", "dcmqrscp"])
def test_pacs_configured_to_refuse_us_rejects_the_association(
    make_pacs: MakePacs, kind: str
) -> None:
    refusing = make_pacs(kind, load=False, allowed_peers=[])
    for context in (Verification, FIND, MOVE):
        assert _refused(_associate(refusing, context))
    assert not refusing.echo()
    # the same config lets a listed peer in, so the refusal really is about who we are
    picky = make_pacs(kind, load=False, allowed_peers=[CALLING_AE])
    assoc = _associate(picky, Verification)
    assert assoc.is_established
    assoc.release()
    assert _refused(_associate(picky, Verification, calling="SOMEONEELSE"))


@pytest.mark.parametrize("kind", ["orthanc", "dcmqrscp", "qrscp"])
def test_kill_then_restart_keeps_the_data(
    make_pacs: MakePacs, synthetic_files: list[Path], kind: str
) -> None:
    pacs = make_pacs(kind, load=synthetic_files[:3])
    pacs.kill()
    assert not pacs.running
    with socket.socket() as probe:
        assert probe.connect_ex((pacs.host, pacs.port)) != 0, "nothing may answer after kill()"
    pacs.restart()
    assert pacs.running and pacs.echo()
    answers = c_find(
        pacs, {"StudyInstanceUID": "", "SeriesInstanceUID": "", "SOPInstanceUID": ""}, "IMAGE"
    )
    assert isinstance(answers, list) and len(answers) == 3


def test_unmodified_qrscp_app_runs_too(make_pacs: MakePacs) -> None:
    pacs = make_pacs("qrscp", load=False, nodelay=False)
    assert pacs.command[2:4] == ["pynetdicom", "qrscp"]
    assert pacs.echo()


@pytest.mark.parametrize(
    ("launcher", "kwargs", "named"),
    [
        (start_orthanc, {"executable": "no-such-orthanc"}, "apt-get install orthanc"),
        (start_dcmqrscp, {"executable": "no-such-dcmqrscp"}, "apt-get install dcmtk"),
        (start_qrscp, {"python": "no-such-python"}, "no-such-python"),
    ],
)
def test_missing_binary_is_a_clear_failure(
    tmp_path: Path, launcher: MakePacs, kwargs: dict[str, str], named: str
) -> None:
    with pytest.raises(PacsServerError, match="not found on PATH") as failure:
        launcher(tmp_path, **kwargs)
    assert named in str(failure.value)
    assert next(iter(kwargs.values())) in str(failure.value)


def test_server_that_exits_at_start_fails_with_its_log(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    broken = {"StorageDirectory": str(tmp_path / "a-file" / "db")}
    try:
        pacs = start_orthanc(tmp_path / "orthanc", extra_config=broken)
    except PacsServerError as failure:
        message = str(failure)
    else:
        pacs.kill()
        pytest.fail("Orthanc started with a storage directory under a regular file")
    assert "orthanc exited with code" in message
    assert "Not a directory" in message  # the tail of Orthanc's own log


def test_lost_port_race_is_retried_on_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket()  # bound, not listening, no SO_REUSEADDR: dcmqrscp cannot bind it
    taken.bind((HOST, 0))
    ports = iter([taken.getsockname()[1]])
    real_free_port = pacs_servers.free_port
    monkeypatch.setattr(pacs_servers, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with start_dcmqrscp(tmp_path) as pacs:
            assert pacs.port != taken.getsockname()[1]
            assert pacs.echo()
            assert "Address already in use" in (tmp_path / "dcmqrscp.log").read_text()
    finally:
        taken.close()
