"""The whole path for a CSV: real PACS → relabel → XNAT emulator's prearchive, checked file by file.

Issue 4's 'done when': open the files that landed and compare them with the PACS copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dqr_xnat.model import JobState
from dqr_xnat.reporting import HIDDEN_SUBJECT
from dqr_xnat.service import Service
from dqr_xnat.stages.labels import make_labels
from dqr_xnat.sandbox.testdata import default_catalog, find
from tests.e2e.helpers import assert_relabeled_copy, load, source_by_sop, write_config
from tests.fixtures.xnat import XNAT_PROJECT

CSV = """\
Accession Number,Patient Name,Study Date,Modality,Subject,Session,Relabel Study Date
ACC0101,,,,Subj001,Subj001_CT1,20000101
,DOE^JANE,20000229,PT,Subj002,Subj002_PET1,
ACC0401,,,,Subj003,,
,MÜLLER^HANS,20240301,,,,
ACC9999,,,,Subj004,Subj004_X,
"""


def _expected(catalog):
    by_acc = {s.accession: s for s in catalog if s.accession}
    mueller_ct = find(catalog, patient_name="MÜLLER^HANS", study_date="20240301")[0]
    fallback = make_labels(XNAT_PROJECT, patient_name="MÜLLER^HANS", study_id="", accession_number="",
                           study_instance_uid=mueller_ct.study_uid).session
    return {
        # study, subject, session, relabel plan
        2: (by_acc["ACC0101"], "Subj001", "Subj001_CT1",
            {"PatientName": "Subj001", "PatientID": "Subj001", "StudyID": "Subj001_CT1",
             "AccessionNumber": "Subj001_CT1", "StudyDate": "20000101"}),
        3: (by_acc["ACC0201"], "Subj002", "Subj002_PET1",
            {"PatientName": "Subj002", "PatientID": "Subj002", "StudyID": "Subj002_PET1",
             "AccessionNumber": "Subj002_PET1"}),
        4: (by_acc["ACC0401"], "Subj003", "5", {"PatientName": "Subj003", "PatientID": "Subj003"}),
        5: (mueller_ct, "M_LLER_HANS", fallback, {}),
    }


def _run_import(tmp_path, pacs, xnat_emulator, port, csv_text, retrieve="c-move", engine="pynetdicom"):
    config = load(write_config(tmp_path, pacs, xnat_emulator, port, retrieve=retrieve, engine=engine))
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text(csv_text, encoding="utf-8")
    with Service(config) as service:
        job = service.import_local(XNAT_PROJECT, csv_path)
    report = json.loads((tmp_path / "batch.report.json").read_text(encoding="utf-8"))
    return job, report


@pytest.mark.parametrize("kind", ["orthanc", "dcmqrscp", "qrscp"])
@pytest.mark.parametrize(("retrieve", "engine"),
                         [("c-move", "pynetdicom"), ("c-move", "dcmtk"), ("c-get", "pynetdicom")],
                         ids=["c-move", "c-move-storescp", "c-get"])
def test_import_lands_relabeled_studies_with_dqr_labels(
    request, kind, retrieve, engine, xnat_emulator, pacs_receiver_port, synthetic_catalog, synthetic_files, tmp_path
):
    any_pacs = request.getfixturevalue(kind)
    job, report = _run_import(tmp_path, any_pacs, xnat_emulator, pacs_receiver_port, CSV, retrieve, engine)
    expected = _expected(synthetic_catalog)
    lines = {entry["line"]: entry for entry in report["lines"]}
    assert lines[6]["status"] == "no-match"
    assert job.state is JobState.DONE, report

    landed = {s.folder: s for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT)}
    assert sorted(landed) == sorted(e[2] for e in expected.values())
    assert not xnat_emulator.prearchive_sessions("Unassigned")
    sources = source_by_sop(synthetic_files)
    for line, (study, subject, session, plan) in expected.items():
        entry = lines[line]
        assert entry["status"] == "imported", entry
        shown = subject if "PatientName" in plan else HIDDEN_SUBJECT  # the label IS the patient name
        assert (entry["subject"], entry["session"]) == (shown, session)
        assert entry["instances_expected"] == entry["instances_received"] == entry["instances_uploaded"] \
            == study.instances
        record = landed[session]
        assert record.subject == subject and record.status == "READY"
        assert record.study_instance_uid == study.study_uid
        assert entry["prearchive_url"] == record.url
        assert len(record.files) == study.instances
        for path in record.files:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert_relabeled_copy(path, sources[sop], plan)
    # Staging disk is freed once studies are in XNAT.
    staging = tmp_path / "state" / "staging"
    assert not any(p.is_file() for p in staging.rglob("*")), list(staging.rglob("*"))[:5]


def test_seed_examples_run_to_final_states(qrscp, xnat_emulator, pacs_receiver_port, tmp_path):
    examples = Path(__file__).resolve().parents[2] / "config" / "examples"
    text = (examples / "date-range-name.csv").read_text(encoding="utf-8")
    job, report = _run_import(tmp_path, qrscp, xnat_emulator, pacs_receiver_port, text)
    lines = {entry["line"]: entry for entry in report["lines"]}
    assert lines[2]["status"] == "no-match"
    # -19991231 with no name criterion: only doe^lower's study of 19991231 (no relabel columns).
    assert (lines[3]["status"], lines[3]["subject"], lines[3]["session"]) == ("imported", HIDDEN_SUBJECT, "ACC0301")
    assert [s.subject for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT)] == ["doe_lower"]
    assert job.state is JobState.DONE
    for name in ("accession-subject-session.csv", "modality-date.csv"):
        (tmp_path / name).mkdir()
        job, report = _run_import(tmp_path / name, qrscp, xnat_emulator, pacs_receiver_port,
                                  (examples / name).read_text(encoding="utf-8"))
        assert [e["status"] for e in report["lines"]] == ["no-match"]


def test_unknown_or_unwritable_project_fails_before_anything_is_sent(
    qrscp, xnat_emulator, pacs_receiver_port, tmp_path
):
    from dqr_xnat.errors import XnatError

    xnat_emulator.add_project("LOCKED", owner="admin")
    xnat_emulator.grant("LOCKED", "dqr-service", "collaborator")
    projects = {p: {"pacs": [qrscp.kind]} for p in (XNAT_PROJECT, "LOCKED", "NOPE")}
    config = load(write_config(tmp_path, qrscp, xnat_emulator, pacs_receiver_port, projects=projects))
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text(CSV, encoding="utf-8")
    with Service(config) as service:
        for project in ("LOCKED", "NOPE"):
            with pytest.raises(XnatError) as info:
                service.import_local(project, csv_path)
            assert project in str(info.value)
    assert not any(r.path.endswith("/services/import") for r in xnat_emulator.requests)


@pytest.mark.parametrize("kind", ["orthanc", "dcmqrscp", "qrscp"])
def test_series_filter_drops_dose_reports_on_every_pacs(
    request, kind, xnat_emulator, pacs_receiver_port, tmp_path
):
    """dcmqrscp and qrscp return no SeriesDescription: the rule is then applied to the DICOM itself."""
    pacs = request.getfixturevalue(kind)
    projects = {XNAT_PROJECT: {"pacs": [kind], "series": {"exclude": ["dose report"]}}}
    config = load(write_config(tmp_path, pacs, xnat_emulator, pacs_receiver_port, projects=projects))
    csv_path = tmp_path / "batch.csv"
    csv_path.write_text("Accession Number,Subject,Session\nACC0101,S1,S1_CT\nACC0201,S2,S2_PET\n"
                        "ACC0301,S3,S3_CT\n")
    with Service(config) as service:
        job = service.import_local(XNAT_PROJECT, csv_path)
    assert job.state is JobState.DONE, job.message
    landed = {s.folder: s for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT)}
    assert {k: len(v.files) for k, v in landed.items()} == {"S1_CT": 32, "S2_PET": 40, "S3_CT": 25}
    for record in landed.values():
        for path in record.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.get("SeriesDescription", "") != "Dose Report"
            assert ds.Modality not in ("SR", "OT")


def test_several_studies_with_one_session_label_are_ambiguous_or_suffixed_by_policy(
    orthanc, xnat_emulator, pacs_receiver_port, tmp_path
):
    csv_text = "Patient ID,Subject,Session\nPID0001,Subj001,Subj001_V\n"
    job, report = _run_import(tmp_path, orthanc, xnat_emulator, pacs_receiver_port, csv_text)
    assert [(e["status"], e["line"]) for e in report["lines"]] == [("ambiguous", 2)]
    assert "2 studies" in report["lines"][0]["reason"]
    assert job.state is JobState.FAILED and not xnat_emulator.prearchive_sessions(XNAT_PROJECT)

    projects = {XNAT_PROJECT: {"pacs": ["orthanc"], "multiple_matches": "suffix"}}
    (tmp_path / "x").mkdir()
    config = load(write_config(tmp_path / "x", orthanc, xnat_emulator, pacs_receiver_port, projects=projects))
    csv_path = tmp_path / "x" / "batch.csv"
    csv_path.write_text(csv_text)
    with Service(config) as service:
        job = service.import_local(XNAT_PROJECT, csv_path)
    assert job.state is JobState.DONE
    landed = {s.folder: s.study_instance_uid for s in xnat_emulator.prearchive_sessions(XNAT_PROJECT)}
    by_date = {s.study_date: s.study_uid for s in find(default_catalog(), patient_id="PID0001")}
    # _1, _2 in study date order (20230110 CT, then 20230211 MR)
    assert landed == {"Subj001_V_1": by_date["20230110"], "Subj001_V_2": by_date["20230211"]}
