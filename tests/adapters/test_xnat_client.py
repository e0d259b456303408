"""XnatClient against the XNAT emulator: login paths, files, configs, imports, errors, secrets."""

from __future__ import annotations

import logging
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest

from dqr_xnat.adapters.xnat import PrearchiveEntry, XnatClient, validate_label
from dqr_xnat.config import XnatConfig
from dqr_xnat.errors import (
    LabelError,
    RetriableXnatError,
    WrongProjectError,
    XnatAuthError,
    XnatError,
)
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.xnat import (
    XNAT_ADMIN,
    XNAT_PASSWORD,
    XNAT_PROJECT,
    XNAT_USER,
    EmulatorFactory,
    ZipFactory,
    write_study_zip,
    study_datasets,
    xnat_config_for,
)

P = XNAT_PROJECT


def calls(emu: XnatEmulator) -> list[tuple[str, str, int]]:
    return [(r.method, r.path, r.status) for r in emu.requests]


# ------------------------------------------------------------------------------------------
# Login


def test_password_login_uses_no_model_and_lists_projects(xnat_emulator: XnatEmulator,
                                                         xnat_config: XnatConfig) -> None:
    xnat_emulator.add_project("HIDDEN", owner=XNAT_ADMIN)
    with XnatClient(xnat_config) as client:
        assert client.logged_in_user == XNAT_USER
        assert client.projects() == [P]
        assert client.project_exists(P) and client.project_exists("HIDDEN")  # 403: exists, unreadable
        assert not client.project_exists("NOPE")
    paths = [path for _, path, _ in calls(xnat_emulator)]
    assert paths[:4] == ["/", "/data/services/auth", "/data/auth", "/data/JSESSION"]
    assert paths[-1] == "/data/JSESSION" and not any(p.startswith("/xapi/schemas") for p in paths)


def test_token_login_and_token_renewal(xnat_emulator: XnatEmulator, xnat_client: XnatClient,
                                       tmp_path: Path) -> None:
    before = datetime.now(timezone.utc)
    token = xnat_client.issue_token()
    assert token.expires_at is not None
    assert timedelta(hours=47) < token.expires_at - before <= timedelta(hours=48, minutes=1)
    config = xnat_config_for(xnat_emulator, tmp_path, token.alias, token.secret)
    xnat_emulator.clear_requests()
    with XnatClient(config) as by_token:
        assert by_token.uses_token and by_token.logged_in_user == XNAT_USER
        assert by_token.projects() == [P]
        renewed = by_token.issue_token()
    assert renewed.alias != token.alias
    assert ("PUT", "/data/services/auth", 200) not in calls(xnat_emulator)


def test_expired_session_relogs_in_once_and_retries(xnat_emulator: XnatEmulator, xnat_client: XnatClient) -> None:
    xnat_emulator.put_resource_file(P, "DQR", "a.csv", b"x")
    assert [f.path for f in xnat_client.list_files(P, "DQR")] == ["a.csv"]
    xnat_emulator.expire_sessions()
    xnat_emulator.clear_requests()
    assert [f.path for f in xnat_client.list_files(P, "DQR")] == ["a.csv"]
    seen = calls(xnat_emulator)
    assert seen[0] == ("GET", f"/data/projects/{P}/resources/DQR/files", 401)
    assert ("PUT", "/data/services/auth", 200) in seen
    assert seen[-1] == ("GET", f"/data/projects/{P}/resources/DQR/files", 200)


def test_persistent_401_is_an_auth_error_naming_the_project(xnat_emulator: XnatEmulator,
                                                            xnat_client: XnatClient) -> None:
    xnat_emulator.inject("GET", r"/resources/DQR/files", status=401, times=None)
    with pytest.raises(XnatAuthError) as excinfo:
        xnat_client.list_files(P, "DQR")
    assert excinfo.value.status == 401 and excinfo.value.project == P
    assert f"project '{P}'" in str(excinfo.value) and "xnat-secret" in str(excinfo.value)
    assert sum(1 for m, p, _ in calls(xnat_emulator) if p == "/data/services/auth") == 2  # one re-login only


def test_login_failures_are_translated_without_the_secret(xnat_emulator: XnatEmulator, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "Wrong-Password-123"
    with pytest.raises(XnatAuthError) as excinfo:
        XnatClient(xnat_config_for(xnat_emulator, tmp_path, XNAT_USER, wrong)).connect()
    assert "refused the login" in str(excinfo.value) and "xnat.user" in str(excinfo.value)
    xnat_emulator.inject("PUT", r"/data/services/auth", status=503)
    with pytest.raises(RetriableXnatError, match="retries later"):
        XnatClient(xnat_config_for(xnat_emulator, tmp_path)).connect()
    for secret in (wrong, XNAT_PASSWORD):
        assert secret not in str(excinfo.value) and secret not in caplog.text


def test_unreachable_xnat_and_slow_answers_are_retriable(xnat_emulator_factory: EmulatorFactory,
                                                         tmp_path: Path) -> None:
    emu = xnat_emulator_factory()
    slow = XnatClient(xnat_config_for(emu, tmp_path, timeout=0.3))
    with slow:
        emu.inject("GET", r"/resources/DQR/files", status=None, delay=1.0)
        with pytest.raises(RetriableXnatError, match=f"project '{P}'"):
            slow.list_files(P, "DQR")
    config = xnat_config_for(emu, tmp_path)
    emu.stop()
    with pytest.raises(RetriableXnatError, match="cannot reach XNAT"):
        XnatClient(config).connect()


@pytest.mark.parametrize(("status", "kind"), [(500, RetriableXnatError), (503, RetriableXnatError),
                                              (429, RetriableXnatError), (408, RetriableXnatError),
                                              (403, XnatAuthError), (409, XnatError), (404, XnatError)])
def test_http_errors_map_to_error_types(status: int, kind: type[XnatError], xnat_emulator: XnatEmulator,
                                        xnat_client: XnatClient) -> None:
    xnat_emulator.put_resource_file(P, "DQR", "a.csv", b"x")
    xnat_emulator.inject("GET", r"/files/a\.csv", status=status)
    with pytest.raises(kind) as excinfo:
        xnat_client.read_file(P, "DQR", "a.csv")
    assert type(excinfo.value) is kind and excinfo.value.status == status and excinfo.value.project == P
    assert f"project '{P}'" in str(excinfo.value) and f"HTTP {status}" in str(excinfo.value)
    assert xnat_client.read_file(P, "DQR", "a.csv") == b"x"  # the fault was one-shot


# ------------------------------------------------------------------------------------------
# Projects, files, configs


def test_can_write_follows_roles(xnat_emulator: XnatEmulator, xnat_client: XnatClient) -> None:
    for project, role in (("MEM", "member"), ("COL", "collaborator"), ("NONE", None)):
        xnat_emulator.add_project(project, owner=XNAT_ADMIN)
        xnat_emulator.grant(project, XNAT_USER, role)
    assert [xnat_client.can_write(p) for p in (P, "MEM", "COL", "NONE", "NOPE")] == [True, True, False, False,
                                                                                      False]
    xnat_client.ensure_writable("MEM")
    with pytest.raises(XnatAuthError, match="member or owner access"):
        xnat_client.ensure_writable("COL")
    with pytest.raises(XnatError, match="does not exist") as excinfo:
        xnat_client.ensure_writable("NOPE")
    assert excinfo.value.status == 404


def test_can_write_falls_back_when_access_api_is_missing(xnat_emulator: XnatEmulator,
                                                         xnat_client: XnatClient) -> None:
    xnat_emulator.inject("GET", r"/xapi/access/projects", status=404, times=2)
    assert xnat_client.can_write(P) is True
    assert xnat_client.can_write("NOPE") is False


def test_files_list_download_read_upload_delete(xnat_emulator: XnatEmulator, xnat_client: XnatClient,
                                                tmp_path: Path) -> None:
    assert xnat_client.list_files(P, "DQR") == []  # no resource yet
    data = b"AccessionNumber\n" + b"A1\n" * 50_000
    xnat_emulator.put_resource_file(P, "DQR", "PACS1/rows one.csv", data)
    [remote] = xnat_client.list_files(P, "DQR")
    assert (remote.path, remote.size, len(remote.digest)) == ("PACS1/rows one.csv", len(data), 32)
    target = xnat_client.download_file(P, "DQR", remote.path, tmp_path / "dl" / "rows.csv")
    assert target.read_bytes() == data and not (tmp_path / "dl" / "rows.csv.part").exists()
    assert xnat_client.read_file(P, "DQR", remote.path) == data
    with pytest.raises(XnatError, match="larger than"):
        xnat_client.read_file(P, "DQR", remote.path, max_bytes=100)
    source = tmp_path / "report.csv"
    source.write_bytes(b"v1")
    xnat_client.upload_file(P, "DQR_REPORTS", "job #1/report.csv", source)
    xnat_client.upload_file(P, "DQR_REPORTS", "job #1/report.csv", b"v2")  # replaces (overwrite=True)
    assert xnat_emulator.read_resource_file(P, "DQR_REPORTS", "job #1/report.csv") == b"v2"
    with pytest.raises(XnatError, match="kept the old file"):
        xnat_client.upload_file(P, "DQR_REPORTS", "job #1/report.csv", b"v3", overwrite=False)
    assert xnat_emulator.read_resource_file(P, "DQR_REPORTS", "job #1/report.csv") == b"v2"
    assert xnat_client.delete_file(P, "DQR", remote.path) is True
    assert xnat_client.delete_file(P, "DQR", remote.path) is False
    with pytest.raises(XnatError) as excinfo:
        xnat_client.read_file(P, "DQR", remote.path)
    assert excinfo.value.status == 404
    with pytest.raises(XnatError, match="project 'NOPE' does not exist"):
        xnat_client.list_files("NOPE", "DQR")


def test_read_only_account_cannot_upload(xnat_emulator_factory: EmulatorFactory, tmp_path: Path) -> None:
    emu = xnat_emulator_factory(role="collaborator")
    with XnatClient(xnat_config_for(emu, tmp_path)) as client:
        with pytest.raises(XnatAuthError, match="member or owner access") as excinfo:
            client.upload_file(P, "DQR_REPORTS", "r.csv", b"x")
    assert excinfo.value.status == 403


def test_read_project_config(xnat_emulator: XnatEmulator, xnat_client: XnatClient) -> None:
    assert xnat_client.read_project_config(P, "dqr", "settings.yaml") is None
    xnat_emulator.set_config(P, "dqr", "settings.yaml", "pacs: [pacs1]\n")
    assert xnat_client.read_project_config(P, "dqr", "settings.yaml") == "pacs: [pacs1]\n"
    xnat_emulator.set_config(P, "dqr", "settings.yaml", "pacs: [pacs1]\n", status="disabled")
    assert xnat_client.read_project_config(P, "dqr", "settings.yaml") is None


# ------------------------------------------------------------------------------------------
# Import and prearchive


def test_import_lands_ready_with_labels_and_reads_status(xnat_emulator: XnatEmulator, xnat_client: XnatClient,
                                                         dicom_zip_factory: ZipFactory) -> None:
    zip_path, datasets = dicom_zip_factory(instances=3)
    result = xnat_client.import_study(P, "SUBJ_01", "SESS-01", zip_path)
    assert (result.project, result.status, result.instances) == (P, "READY", 3)
    [landed] = xnat_emulator.prearchive_sessions(P)
    assert result.prearchive_url == landed.url and (landed.subject, landed.folder) == ("SUBJ_01", "SESS-01")
    assert {pydicom.dcmread(f).SOPInstanceUID for f in landed.files} == {d.SOPInstanceUID for d in datasets}
    [request] = [r for r in xnat_emulator.requests if r.path == "/data/services/import"]
    assert request.query == {"import-handler": "DICOM-zip", "dest": f"/prearchive/projects/{P}", "project": P,
                             "subject": "SUBJ_01", "session": "SESS-01"}
    [entry] = xnat_client.find_prearchive(P, datasets[0].StudyInstanceUID)
    assert (entry.url, entry.session, entry.subject, entry.status) == (result.prearchive_url, "SESS-01",
                                                                       "SUBJ_01", "READY")
    assert xnat_client.find_prearchive(P, "1.2.3.4") == []


def test_import_reports_conflict_and_receiving_entries_are_listed(xnat_emulator: XnatEmulator,
                                                                  xnat_client: XnatClient,
                                                                  dicom_zip_factory: ZipFactory) -> None:
    first, _ = dicom_zip_factory()
    second, _ = dicom_zip_factory()
    assert xnat_client.import_study(P, "S1", "SAME", first).status == "READY"
    assert xnat_client.import_study(P, "S2", "SAME", second).status == "CONFLICT"
    xnat_emulator.set_prearchive_status(P, "SAME", "RECEIVING")
    entries = xnat_client.prearchive_entries(P)
    assert [e.status for e in entries] == ["RECEIVING", "RECEIVING"]
    xnat_client.delete_prearchive(entries[0].url)
    xnat_client.delete_prearchive(entries[0].url)  # already gone: fine
    assert [e.url for e in xnat_client.prearchive_entries(P)] == [entries[1].url]
    assert xnat_client.prearchive_entry(entries[0].url) is None


@pytest.mark.parametrize("case", ["unknown", "collaborator"])
def test_unassigned_routing_is_undone_and_reported(case: str, xnat_emulator: XnatEmulator,
                                                   xnat_client: XnatClient, dicom_zip_factory: ZipFactory) -> None:
    project = "NOPE" if case == "unknown" else "READONLY"
    if case == "collaborator":
        xnat_emulator.add_project(project, owner=XNAT_ADMIN)
        xnat_emulator.grant(project, XNAT_USER, "collaborator")
    zip_path, _ = dicom_zip_factory()
    with pytest.raises(WrongProjectError) as excinfo:
        xnat_client.import_study(project, "S1", "E1", zip_path)
    message = str(excinfo.value)
    assert "'Unassigned' instead of project" in message and "deleted again" in message
    assert excinfo.value.project == project and "member or owner access" in message
    assert xnat_emulator.prearchive_sessions() == []
    assert ("POST", "/data/services/prearchive/delete", 200) in calls(xnat_emulator)


def test_unassigned_that_cannot_be_deleted_asks_for_an_admin(xnat_emulator: XnatEmulator,
                                                             xnat_client: XnatClient,
                                                             dicom_zip_factory: ZipFactory) -> None:
    xnat_emulator.unassigned_visible_to_uploader = False  # XNAT shows Unassigned to admins only
    zip_path, _ = dicom_zip_factory()
    with pytest.raises(WrongProjectError, match="ask an XNAT administrator to delete /data/prearchive/projects/"
                                                "Unassigned/"):
        xnat_client.import_study("NOPE", "S1", "E1", zip_path)
    assert len(xnat_emulator.prearchive_sessions("Unassigned")) == 1


@pytest.mark.parametrize(("project", "subject", "session"), [
    (P, "DOE^JOHN", "S1"), (P, "S1", "a.b c"), (P, "", "S1"), ("bad project", "S1", "S1"), (P, "S1", "x" * 65),
])
def test_illegal_labels_are_refused_before_any_request(project: str, subject: str, session: str,
                                                       xnat_emulator: XnatEmulator, xnat_client: XnatClient,
                                                       dicom_zip_factory: ZipFactory) -> None:
    zip_path, _ = dicom_zip_factory()
    xnat_emulator.clear_requests()
    with pytest.raises(LabelError) as excinfo:
        xnat_client.import_study(project, subject, session, zip_path)
    assert xnat_emulator.requests == []
    assert "DOE" not in str(excinfo.value) and "JOHN" not in str(excinfo.value)  # labels may carry PHI


def test_validate_label_accepts_xnat_label_chars() -> None:
    validate_label("session", "Ab_9-z")
    with pytest.raises(LabelError, match=r"\('\^'\)"):
        validate_label("subject", "DOE^JOHN")


def test_import_failures(xnat_emulator: XnatEmulator, xnat_client: XnatClient, dicom_zip_factory: ZipFactory,
                         tmp_path: Path) -> None:
    zip_path, _ = dicom_zip_factory()
    xnat_emulator.inject("POST", r"/data/services/import", status=500)
    with pytest.raises(RetriableXnatError, match=f"project '{P}'"):
        xnat_client.import_study(P, "S1", "E1", zip_path)
    assert xnat_emulator.prearchive_sessions() == []
    both = write_study_zip(tmp_path / "two.zip", study_datasets(1) + study_datasets(1))
    with pytest.raises(XnatError, match="exactly one study"):
        xnat_client.import_study(P, "S1", "E2", both)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(XnatError, match="cannot read the study zip"):
        xnat_client.import_study(P, "S1", "E3", tmp_path / "broken.zip")
    with zipfile.ZipFile(zip_path, "a") as archive:
        archive.writestr("readme.txt", "not DICOM")
    with pytest.raises(XnatError) as excinfo:
        xnat_client.import_study(P, "S1", "E4", zip_path)
    assert excinfo.value.status == 400 and "Unable to parse" in str(excinfo.value)


def test_import_after_session_expiry_relogs_in(xnat_emulator: XnatEmulator, xnat_client: XnatClient,
                                               dicom_zip_factory: ZipFactory) -> None:
    xnat_client.projects()
    xnat_emulator.expire_sessions()
    zip_path, _ = dicom_zip_factory()
    assert xnat_client.import_study(P, "S1", "E1", zip_path).status == "READY"
    imports = [s for m, p, s in calls(xnat_emulator) if p == "/data/services/import"]
    assert imports == [401, 200]


def test_prearchive_entry_from_row_adds_data_prefix() -> None:
    entry = PrearchiveEntry.from_row({"url": "/prearchive/projects/P/20240101_120000123/S", "project": "P",
                                      "folderName": "S", "name": "S", "tag": "1.2", "status": "READY"})
    assert entry.url == "/data/prearchive/projects/P/20240101_120000123/S" and entry.study_instance_uid == "1.2"


def test_no_secret_in_logs_or_errors_across_a_session(xnat_emulator: XnatEmulator, xnat_config: XnatConfig,
                                                      tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    with XnatClient(xnat_config) as client:
        token = client.issue_token()
        xnat_emulator.expire_sessions()
        client.projects()
        xnat_emulator.inject("*", r"/data/projects", status=401, times=None)
        with pytest.raises(XnatAuthError) as excinfo:
            client.projects()
        errors.append(str(excinfo.value))
    xnat_emulator.clear_faults()
    token_config = xnat_config_for(xnat_emulator, tmp_path, token.alias, token.secret)
    xnat_emulator.store.tokens[token.alias].enabled = False
    with pytest.raises(XnatAuthError) as excinfo:
        XnatClient(token_config).connect()
    errors.append(str(excinfo.value))
    assert "alias tokens expire" in errors[-1] and token.alias not in errors[-1]
    for secret in (XNAT_PASSWORD, token.secret):
        assert secret not in caplog.text and all(secret not in e for e in errors)
