"""The XNAT emulator honours xnat-contract.md §7, row by row, driven by xnatpy itself.

Each test names its contract row(s). xnatpy is the client on purpose: the rows were written from
what xnatpy sends and expects, so these tests fail if the emulator drifts from what the product's
real client needs.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
import requests
import xnat
from xnat.exceptions import XNATLoginFailedError, XNATResponseError, XNATUploadError

from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.xnat import (
    XNAT_ADMIN,
    XNAT_ADMIN_PASSWORD,
    XNAT_PASSWORD,
    XNAT_PROJECT,
    XNAT_USER,
    EmulatorFactory,
    ZipFactory,
    study_datasets,
)

P = XNAT_PROJECT


def connect(emu: XnatEmulator, user: str = XNAT_USER, password: str = XNAT_PASSWORD,
            **kwargs: object) -> xnat.session.XNATSession:
    options: dict[str, object] = {"no_parse_model": True, "loglevel": "ERROR"}
    options.update(kwargs)
    return xnat.connect(emu.url, user=user, password=password, **options)


@pytest.fixture
def session(xnat_emulator: XnatEmulator) -> Iterator[xnat.session.XNATSession]:
    with connect(xnat_emulator) as s:
        yield s


def status_of(excinfo: pytest.ExceptionInfo[XNATResponseError]) -> int:
    return excinfo.value.status_code


def all_strings(rows: list[dict[str, object]]) -> bool:
    return all(isinstance(v, str) for row in rows for v in row.values())


# ------------------------------------------------------------------------------------------
# A1-A7: login sequence


def test_a1_to_a5_password_login_sequence_is_exactly_what_xnatpy_sends(xnat_emulator: XnatEmulator) -> None:
    with connect(xnat_emulator) as s:
        assert s.logged_in_user == XNAT_USER
        sid = s.interface.cookies.get("JSESSIONID")
        assert sid and s.get("/data/JSESSION").text == sid
    calls = [(r.method, r.path, r.status) for r in xnat_emulator.requests]
    assert calls == [
        ("GET", "/", 200),
        ("PUT", "/data/services/auth", 200),
        ("GET", "/data/auth", 200),
        ("GET", "/data/JSESSION", 200),
        ("GET", "/data/JSESSION", 200),
        ("DELETE", "/data/JSESSION", 200),
    ]


def test_a2_auth_answers_session_id_and_cookie_and_401_for_bad_password(xnat_emulator: XnatEmulator) -> None:
    for method in ("PUT", "POST"):
        ok = requests.request(method, xnat_emulator.url + "/data/services/auth",
                              data={"username": XNAT_USER, "password": XNAT_PASSWORD}, timeout=10)
        assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("text/plain")
        assert ok.cookies["JSESSIONID"] == ok.text
    bad = requests.put(xnat_emulator.url + "/data/services/auth",
                       data={"username": XNAT_USER, "password": "wrong"}, timeout=10)
    assert bad.status_code == 401 and "Authentication failed." in bad.text
    with pytest.raises(XNATLoginFailedError, match="Authentication failed"):
        connect(xnat_emulator, password="wrong")


def test_a3_auth_check_text_and_401_without_login(xnat_emulator: XnatEmulator) -> None:
    assert requests.get(xnat_emulator.url + "/data/auth", timeout=10).status_code == 401
    basic = requests.get(xnat_emulator.url + "/data/auth", auth=(XNAT_USER, XNAT_PASSWORD), timeout=10)
    assert basic.status_code == 200 and basic.text == f"User '{XNAT_USER}' is logged in"
    assert "JSESSIONID" in basic.cookies  # XNAT opens a session for Basic logins too


def test_a5_logout_invalidates_the_session(xnat_emulator: XnatEmulator) -> None:
    s = connect(xnat_emulator)
    cookies = s.interface.cookies.copy()
    s.disconnect()
    assert requests.get(xnat_emulator.url + "/data/auth", cookies=cookies, timeout=10).status_code == 401


def test_a6_a7_version_probe_falls_through_to_build_info(session: xnat.session.XNATSession) -> None:
    with pytest.raises(XNATResponseError) as excinfo:
        session.get("/data/version")
    assert status_of(excinfo) == 404
    assert session.xnat_version == "1.8.10"
    assert session.check_version("1.8.3")


# ------------------------------------------------------------------------------------------
# M1-M3: xnatpy's object model


def test_m1_m3_object_model_projects_resources_files(xnat_emulator: XnatEmulator, tmp_path: Path) -> None:
    xnat_emulator.put_resource_file(P, "DQR", "in/rows.csv", b"AccessionNumber\nA1\n")
    with connect(xnat_emulator, no_parse_model=False, extension_types=False) as s:
        project = s.projects[P]
        assert project.name == P
        resource = project.resources["DQR"]
        assert resource.file_count == 1
        assert set(resource.files.keys()) == {"in/rows.csv"}
        resource.upload_data(b"line\n", "report.txt")
        resource.files["report.txt"].download(str(tmp_path / "report.txt"), verbose=False)
        assert (tmp_path / "report.txt").read_bytes() == b"line\n"
        created = project.create_resource("NEW")
        assert created.label == "NEW"
    paths = [r.path for r in xnat_emulator.requests]
    assert "/xapi/schemas/xnat" in paths and "/xapi/schemas/xdat" in paths
    assert "/xapi/schemas" not in paths  # extension_types=False skips the list (M2)
    assert "/data/search/elements" in paths


def test_m2_schema_list_with_extension_types(xnat_emulator: XnatEmulator) -> None:
    with connect(xnat_emulator, no_parse_model=False, extension_types=True) as s:
        assert P in s.projects
    assert ("GET", "/xapi/schemas", 200) in [(r.method, r.path, r.status) for r in xnat_emulator.requests]


# ------------------------------------------------------------------------------------------
# P1, P2, project creation


def test_p1_project_listing_shows_readable_projects_with_string_fields(
        xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    xnat_emulator.add_project("SECRET", owner=XNAT_ADMIN)
    for path in ("/data/projects", "/data/archive/projects"):
        rows = session.get_json(path, query={"columns": "ID,URI,name"})["ResultSet"]["Result"]
        assert [r["ID"] for r in rows] == [P]
        assert set(rows[0]) >= {"ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"}
        assert rows[0]["URI"] == f"/data/projects/{P}" and all_strings(rows)


def test_p2_project_item_form_and_404(session: xnat.session.XNATSession) -> None:
    item = session.get_json(f"/data/projects/{P}")["items"][0]
    assert item["data_fields"]["ID"] == P and item["meta"]["xsi:type"] == "xnat:projectData"
    assert item["meta"]["isHistory"] is False
    with pytest.raises(XNATResponseError) as excinfo:
        session.get_json("/data/projects/NOPE")
    assert status_of(excinfo) == 404


def test_project_put_creates_and_417_for_invalid_id(xnat_emulator: XnatEmulator,
                                                    session: xnat.session.XNATSession) -> None:
    session.put("/data/archive/projects/NEW_1")
    assert "NEW_1" in [r["ID"] for r in session.get_json("/data/projects")["ResultSet"]["Result"]]
    with pytest.raises(XNATResponseError) as excinfo:
        session.put("/data/archive/projects/bad.id")
    assert status_of(excinfo) == 417 and "Invalid character in project ID" in excinfo.value.text


# ------------------------------------------------------------------------------------------
# R1-R3: resources


def test_r1_r2_r3_resource_create_list_409_delete(session: xnat.session.XNATSession) -> None:
    response = session.put(f"/data/projects/{P}/resources/DQR", query={"format": "CSV"})
    assert response.status_code == 200 and response.text == ""
    with pytest.raises(XNATResponseError) as excinfo:
        session.put(f"/data/projects/{P}/resources/DQR")
    assert status_of(excinfo) == 409 and "already exists" in excinfo.value.text
    session.put(f"/data/projects/{P}/resources/OTHER")
    rows = session.get_json(f"/data/projects/{P}/resources")["ResultSet"]["Result"]
    assert [r["label"] for r in rows] == ["DQR", "OTHER"] and all_strings(rows)
    assert "ID" not in rows[0] and "URI" not in rows[0]
    assert rows[0]["element_name"] == "xnat:resourceCatalog" and rows[0]["format"] == "CSV"
    assert rows[0]["file_count"] == "0" and rows[0]["category"] == "resources"
    session.delete(f"/data/projects/{P}/resources/{rows[0]['xnat_abstractresource_id']}")  # numeric id
    session.delete(f"/data/archive/projects/{P}/resources/OTHER")  # label, archive alias
    assert session.get_json(f"/data/projects/{P}/resources")["ResultSet"]["Result"] == []
    with pytest.raises(XNATResponseError) as excinfo:
        session.delete(f"/data/projects/{P}/resources/OTHER")
    assert status_of(excinfo) == 404


# ------------------------------------------------------------------------------------------
# F1-F4: files


def test_f2_first_put_creates_resource_then_duplicates_answer_keeps_old_file(
        xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    uri = f"/data/projects/{P}/resources/DQR/files/reports/r.csv"
    first = session.upload_string(uri, b"old")
    assert first.status_code == 200 and first.text == ""
    again = session.upload_string(uri, b"new")  # xnatpy's default: overwrite=False
    assert again.status_code == 200 and again.json() == {"duplicates": ["reports/r.csv"]}
    assert again.headers["Content-Type"].startswith("text/html")
    assert xnat_emulator.read_resource_file(P, "DQR", "reports/r.csv") == b"old"
    session.upload_string(uri, b"new", overwrite=True)
    assert xnat_emulator.read_resource_file(P, "DQR", "reports/r.csv") == b"new"
    assert ("PUT", "/data/projects/NEURO01/resources/DQR/files/reports/r.csv", {"overwrite": "true"}, 200) \
        in [tuple(r) for r in xnat_emulator.requests]


def test_f2_post_inbody_extract_empty_body_and_content_types(
        xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    base = f"/data/projects/{P}/resources/IN/files"
    session.upload_string(f"{base}/a.txt", b"a", method="post", content_type="text/csv")
    session.upload_string(f"{base}/b.bin", b"b", content_type="application/x-custom", query={"inbody": "true"})
    with pytest.raises(XNATUploadError, match="400"):
        session.upload_string(f"{base}/c.bin", b"c", content_type="application/x-custom")
    with pytest.raises(XNATUploadError, match="400"):
        session.upload_string(f"{base}/empty.txt", b"")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("x/1.txt", "one")
        archive.writestr("2.txt", "two")
    session.upload_string(f"{base}/sub/pack.zip", buf.getvalue(), query={"extract": "true"})
    chunked = requests.put(xnat_emulator.url + f"{base}/chunked.bin", data=iter([b"ab", b"cd"]),
                           headers={"Content-Type": "application/octet-stream"},
                           auth=(XNAT_USER, XNAT_PASSWORD), timeout=10)
    assert chunked.status_code == 200 and chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert xnat_emulator.read_resource_file(P, "IN", "chunked.bin") == b"abcd"
    assert xnat_emulator.resource_files(P, "IN") == ["a.txt", "b.bin", "chunked.bin", "sub/2.txt", "sub/x/1.txt"]


def test_f1_file_listing_by_label_and_numeric_id_and_zip(
        xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    xnat_emulator.put_resource_file(P, "DQR", "a/b.csv", b"hello")
    rid = session.get_json(f"/data/projects/{P}/resources")["ResultSet"]["Result"][0]["xnat_abstractresource_id"]
    for ref in ("DQR", rid):
        rows = session.get_json(f"/data/projects/{P}/resources/{ref}/files",
                                query={"columns": "ID,URI,Name"})["ResultSet"]["Result"]
        assert rows == [{"Name": "b.csv", "Size": "5", "URI": f"/data/projects/{P}/resources/{rid}/files/a/b.csv",
                         "collection": "DQR", "file_tags": "", "file_format": "", "file_content": "",
                         "cat_ID": rid, "digest": "5d41402abc4b2a76b9719d911017c592"}]
    archive = zipfile.ZipFile(io.BytesIO(session.get(f"/data/projects/{P}/resources/DQR/files",
                                                     format="zip").content))
    assert archive.read(f"{P}/resources/DQR/files/a/b.csv") == b"hello"


def test_f3_f4_download_and_delete_with_404s(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                             tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    xnat_emulator.put_resource_file(P, "DQR", "big.bin", data)
    uri = f"/data/projects/{P}/resources/DQR/files/big.bin"
    with open(tmp_path / "big.bin", "wb") as fh:
        session.download_stream(uri, fh)
    assert (tmp_path / "big.bin").read_bytes() == data
    assert session.head(uri).headers["Content-Length"] == str(len(data))
    session.delete(uri)
    for call in (lambda: session.get(uri), lambda: session.delete(uri)):
        with pytest.raises(XNATResponseError) as excinfo:
            call()
        assert status_of(excinfo) == 404


def test_f_collaborator_reads_but_cannot_write(xnat_emulator: XnatEmulator) -> None:
    xnat_emulator.add_user("bob", "bob-pw-1234")
    xnat_emulator.grant(P, "bob", "collaborator")
    xnat_emulator.put_resource_file(P, "DQR", "a.csv", b"1")
    with connect(xnat_emulator, "bob", "bob-pw-1234") as s:
        assert s.get(f"/data/projects/{P}/resources/DQR/files/a.csv").content == b"1"
        with pytest.raises(XNATUploadError, match="403"):
            s.upload_string(f"/data/projects/{P}/resources/DQR/files/b.csv", b"2")
        with pytest.raises(XNATResponseError) as excinfo:
            s.put(f"/data/projects/{P}/resources/NEW")
        assert status_of(excinfo) == 403


# ------------------------------------------------------------------------------------------
# C1-C3: configuration service


def test_c1_c3_config_put_201_200_get_contents_404_204(xnat_emulator: XnatEmulator,
                                                        session: xnat.session.XNATSession) -> None:
    uri = f"/data/projects/{P}/config/dqr/settings/pacs.yaml"
    put = lambda text: session.put(uri, data=text, query={"inbody": "true"},  # noqa: E731
                                   headers={"Content-Type": "text/plain"})
    with pytest.raises(XNATResponseError) as excinfo:
        session.get(uri, query={"contents": "true"})
    assert status_of(excinfo) == 404
    assert session.get(uri, query={"contents": "true", "accept-not-found": "true"},
                       accepted_status=[204]).status_code == 204
    assert put("pacs: a\n").status_code == 201
    assert put("pacs: b\n").status_code == 200
    assert put("pacs: b\n").status_code == 200  # identical: still 200
    assert session.get(uri, query={"contents": "true"}).text == "pacs: b\n"
    json_put = session.put(uri, json={"contents": "pacs: c\n"})
    assert json_put.status_code == 200 and xnat_emulator.get_config(P, "dqr", "settings/pacs.yaml") == "pacs: c\n"
    with pytest.raises(XNATResponseError) as excinfo:
        session.put(uri, data=b"", headers={"Content-Type": "text/plain"})
    assert status_of(excinfo) == 400
    with pytest.raises(XNATResponseError) as excinfo:
        session.get(f"/data/projects/NOPE/config/dqr/x", query={"contents": "true"})
    assert status_of(excinfo) == 404


def test_c2_config_listing_rows(session: xnat.session.XNATSession) -> None:
    uri = f"/data/projects/{P}/config/dqr/a"
    session.put(uri, data="x", headers={"Content-Type": "text/plain"}, query={"reason": "init"})
    rows = session.get_json(uri)["ResultSet"]["Result"]
    assert len(rows) == 1 and all_strings(rows)
    assert {k: rows[0][k] for k in ("tool", "path", "project", "user", "reason", "contents", "unversioned",
                                    "version", "status")} == {
        "tool": "dqr", "path": "a", "project": P, "user": XNAT_USER, "reason": "init", "contents": "x",
        "unversioned": "false", "version": "1", "status": "enabled"}
    session.put(uri, query={"status": "disabled"})
    assert session.get(uri, query={"contents": "true", "accept-not-found": "true"},
                       accepted_status=[204]).status_code == 204


def test_c3_config_put_needs_owner(xnat_emulator: XnatEmulator) -> None:
    xnat_emulator.add_user("mem", "mem-pw-1234")
    xnat_emulator.grant(P, "mem", "member")
    xnat_emulator.set_config(P, "dqr", "a", "x")
    with connect(xnat_emulator, "mem", "mem-pw-1234") as s:
        assert s.get(f"/data/projects/{P}/config/dqr/a", query={"contents": "true"}).text == "x"
        with pytest.raises(XNATResponseError) as excinfo:
            s.put(f"/data/projects/{P}/config/dqr/a", data="y", headers={"Content-Type": "text/plain"})
        assert status_of(excinfo) == 403


# ------------------------------------------------------------------------------------------
# I1: import service


def import_zip(client: xnat.session.XNATSession, zip_path: Path, project: str = P, dest: bool = True,
               subject: str = "SUBJ1", label: str = "SESS1") -> object:
    """The product's import call: DICOM-zip, application/zip, explicit dest/project/subject/session."""
    return client.services.import_(
        data=zip_path.read_bytes(), content_type="application/zip", import_handler="DICOM-zip",
        destination=f"/prearchive/projects/{project}" if dest else None, project=project,
        subject=subject, experiment=label)


def test_i1_import_with_dest_lands_ready_in_prearchive_on_disk(
        xnat_emulator: XnatEmulator, session: xnat.session.XNATSession, dicom_zip_factory: ZipFactory) -> None:
    zip_path, datasets = dicom_zip_factory(instances=3, StudyDate="20240131", StudyTime="101530")
    landed = import_zip(session, zip_path)
    assert re.fullmatch(rf"/data/prearchive/projects/{P}/\d{{8}}_\d{{9}}/SESS1", landed.uri)
    assert (landed.status, landed.subject, landed.label, landed.project) == ("READY", "SUBJ1", "SESS1", P)
    assert landed.tag == datasets[0].StudyInstanceUID
    assert str(landed.scan_date) == "2024-01-31" and str(landed.scan_time) == "10:15:30"
    [record] = xnat_emulator.prearchive_sessions(P)
    assert record.url == landed.uri and len(record.files) == 3
    received = {pydicom.dcmread(f).SOPInstanceUID for f in record.files}
    assert received == {ds.SOPInstanceUID for ds in datasets}
    request = [r for r in xnat_emulator.requests if r.path == "/data/services/import"][0]
    assert request.query == {"dest": f"/prearchive/projects/{P}", "project": P, "subject": "SUBJ1",
                             "session": "SESS1", "import-handler": "DICOM-zip"}


def test_i1_response_is_uri_list_with_crlf_per_study(xnat_emulator: XnatEmulator, dicom_zip_factory: ZipFactory,
                                                     tmp_path: Path) -> None:
    first, _ = dicom_zip_factory(PatientID="PAT^ONE")
    second, _ = dicom_zip_factory(PatientID="PAT2")
    both = tmp_path / "both.zip"
    with zipfile.ZipFile(both, "w") as out:
        for index, source in enumerate((first, second)):
            with zipfile.ZipFile(source) as archive:
                for name in archive.namelist():
                    out.writestr(f"{index}/{name}", archive.read(name))
    response = requests.post(xnat_emulator.url + "/data/services/import", data=both.read_bytes(),
                             params={"dest": f"/prearchive/projects/{P}", "PROJECT_ID": P},
                             headers={"Content-Type": "application/zip"}, auth=(XNAT_USER, XNAT_PASSWORD),
                             timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"] == "text/uri-list"
    lines = response.text.split("\r\n")
    assert len(lines) == 3 and lines[2] == ""
    # No explicit session label: XNAT takes PatientID through toLabelChars ("PAT^ONE" -> "PAT_ONE").
    assert [line.rsplit("/", 1)[1] for line in lines[:2]] == ["PAT_ONE", "PAT2"]


def test_i1_tar_upload_and_receiving_turns_ready_when_idle(xnat_emulator: XnatEmulator, tmp_path: Path,
                                                          session: xnat.session.XNATSession) -> None:
    import tarfile

    datasets = study_datasets(2)
    tar_path = tmp_path / "study.tar.gz"
    with tarfile.open(tar_path, "w:gz") as archive:
        for index, ds in enumerate(datasets):
            member = tmp_path / f"{index}.dcm"
            ds.save_as(member, enforce_file_format=True)
            archive.add(member, f"dir/{index}.dcm")
    landed = session.services.import_(data=tar_path.read_bytes(), content_type="application/x-tar", project=P,
                                      subject="S", experiment="TAR")
    assert landed.status == "RECEIVING"
    xnat_emulator.receiving_idle = 0.0  # XNAT's rebuilder: idle sessions are built (READY)
    landed.clearcache()
    assert landed.status == "READY" and len(xnat_emulator.prearchive_sessions(P)[0].files) == 2


def test_i1_same_study_merges_into_one_session(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                               dicom_zip_factory: ZipFactory) -> None:
    first, datasets = dicom_zip_factory(instances=2)
    second, _ = dicom_zip_factory(instances=1, StudyInstanceUID=datasets[0].StudyInstanceUID)
    one = import_zip(session, first)
    two = import_zip(session, second, label="OTHER_LABEL")
    assert one.uri == two.uri
    [record] = xnat_emulator.prearchive_sessions(P)
    assert len(record.files) == 3 and record.folder == "SESS1"


def test_i1_without_dest_is_receiving_until_built(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                                  dicom_zip_factory: ZipFactory) -> None:
    zip_path, _ = dicom_zip_factory()
    landed = import_zip(session, zip_path, dest=False)
    assert landed.status == "RECEIVING"
    assert session.prearchive.sessions(P) == []  # xnatpy hides RECEIVING by default
    assert len(session.prearchive.sessions(P, allow_receiving=True)) == 1
    assert xnat_emulator.finish_receiving(P) == 1
    landed.clearcache()
    assert landed.status == "READY"


@pytest.mark.parametrize("case", ["unknown", "collaborator"])
def test_i1_unknown_or_unwritable_project_silently_goes_to_unassigned(
        case: str, xnat_emulator: XnatEmulator, dicom_zip_factory: ZipFactory) -> None:
    project = "NOPE" if case == "unknown" else "READONLY"
    if case == "collaborator":
        xnat_emulator.add_project("READONLY", owner=XNAT_ADMIN)
        xnat_emulator.grant("READONLY", XNAT_USER, "collaborator")
    zip_path, _ = dicom_zip_factory()
    with connect(xnat_emulator) as s:
        landed = import_zip(s, zip_path, project=project)
        assert landed.uri.startswith("/data/prearchive/projects/Unassigned/")
    [record] = xnat_emulator.prearchive_sessions("Unassigned")
    assert record.status == "READY" and record.folder == "SESS1"
    with connect(xnat_emulator, XNAT_ADMIN, XNAT_ADMIN_PASSWORD) as admin:
        assert [x.uri for x in admin.prearchive.sessions("Unassigned")] == [landed.uri]


def test_i1_dicom_routing_finds_project_in_comments(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                                    dicom_zip_factory: ZipFactory) -> None:
    zip_path, _ = dicom_zip_factory(PatientComments=f"Project: {P} Subject:S9 Session:S9_MR1")
    response = session.post("/data/services/import", data=zip_path.read_bytes(),
                            headers={"Content-Type": "application/zip"})
    assert response.text == f"{response.text.split('/S9_MR1')[0]}/S9_MR1\r\n"
    assert xnat_emulator.prearchive_sessions(P)[0].subject == "S9"


def test_i1_same_label_other_study_is_conflict(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                               dicom_zip_factory: ZipFactory) -> None:
    first, _ = dicom_zip_factory()
    second, _ = dicom_zip_factory()
    assert import_zip(session, first).status == "READY"
    assert import_zip(session, second).status == "CONFLICT"
    assert sorted(r.status for r in xnat_emulator.prearchive_sessions(P)) == ["CONFLICT", "READY"]


def test_i1_bad_uploads_are_400(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                dicom_zip_factory: ZipFactory, tmp_path: Path) -> None:
    zip_path, _ = dicom_zip_factory()
    with pytest.raises(XNATUploadError, match="400"):  # octet-stream: XNAT derives "upload", no format
        session.services.import_(data=zip_path.read_bytes(), project=P, destination=f"/prearchive/projects/{P}")
    with pytest.raises(XNATUploadError, match="400"):
        session.services.import_(data=b"not a zip", content_type="application/zip", project=P)
    with_text, _ = dicom_zip_factory(name="mixed.zip")
    with zipfile.ZipFile(with_text, "a") as archive:
        archive.writestr("notes.txt", "not dicom")
    with pytest.raises(XNATUploadError, match="400"):
        session.services.import_(data=with_text.read_bytes(), content_type="application/zip", project=P,
                                 destination=f"/prearchive/projects/{P}", experiment="MIXED")
    landed = session.services.import_(data=with_text.read_bytes(), content_type="application/zip", project=P,
                                      destination=f"/prearchive/projects/{P}", experiment="MIXED",
                                      ignore_unparsable=True)
    assert landed.status == "READY"


def test_i1_gradual_dicom_and_direct_archive(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                             dicom_zip_factory: ZipFactory) -> None:
    zip_path, datasets = dicom_zip_factory(instances=1)
    member = zipfile.ZipFile(zip_path).read(zipfile.ZipFile(zip_path).namelist()[0])
    landed = session.services.import_(data=member, content_type="application/dicom", project=P,
                                      subject="S", experiment="GRADUAL")
    assert landed.uri.endswith("/GRADUAL") and landed.status == "RECEIVING"
    other, _ = dicom_zip_factory()
    response = session.post("/data/services/import", data=other.read_bytes(),
                            query={"project": P, "subject": "S", "session": "DIRECT", "Direct-Archive": "true"},
                            headers={"Content-Type": "application/zip"})
    assert response.text == f"/data/archive/projects/{P}/subjects/S/experiments/DIRECT\r\n"
    assert len(xnat_emulator.archived_sessions(P)[0].files) == 2


# ------------------------------------------------------------------------------------------
# Q1-Q5: prearchive


def test_q1_q2_prearchive_listing_and_one_session_shapes(xnat_emulator: XnatEmulator,
                                                          session: xnat.session.XNATSession,
                                                          dicom_zip_factory: ZipFactory) -> None:
    zip_path, datasets = dicom_zip_factory()
    landed = import_zip(session, zip_path)
    for path in ("/data/prearchive/projects", f"/data/prearchive/projects/{P}", landed.uri):
        rows = session.get_json(path)["ResultSet"]["Result"]
        assert len(rows) == 1 and all_strings(rows)
        assert set(rows[0]) == {"project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time", "subject",
                                "folderName", "name", "tag", "status", "url", "autoarchive", "prevent_anon",
                                "prevent_auto_commit", "SOURCE", "VISIT", "PROTOCOL", "TIMEZONE"}
        assert rows[0]["url"] == landed.uri[len("/data"):] and rows[0]["tag"] == datasets[0].StudyInstanceUID
    [listed] = session.prearchive.sessions(P)
    assert (listed.folder_name, listed.status, listed.autoarchive) == ("SESS1", "READY", "Manual")
    assert listed.uploaded is not None and listed.lastmod >= listed.uploaded
    with pytest.raises(XNATResponseError) as excinfo:
        session.get_json(landed.uri.replace("SESS1", "NOPE"))
    assert status_of(excinfo) == 404


def test_q3_prearchive_scans_and_read_dicom(session: xnat.session.XNATSession, dicom_zip_factory: ZipFactory,
                                            tmp_path: Path) -> None:
    zip_path, datasets = dicom_zip_factory(SeriesNumber=7, SeriesDescription="AX T1")
    landed = import_zip(session, zip_path)
    rows = session.get_json(landed.uri + "/scans")["ResultSet"]["Result"]
    assert rows == [{"ID": "7", "xsiType": "xnat:ctScanData", "series_description": "AX T1"}]
    resources = session.get_json(landed.uri + "/scans/7/resources")["ResultSet"]["Result"]
    assert [(r["label"], r["file_count"]) for r in resources] == [("DICOM", "2")]
    files = session.get_json(landed.uri + "/scans/7/resources/DICOM/files")["ResultSet"]["Result"]
    with open(tmp_path / "one.dcm", "wb") as fh:
        session.download_stream(files[0]["URI"], fh)
    assert pydicom.dcmread(tmp_path / "one.dcm").StudyInstanceUID == datasets[0].StudyInstanceUID
    landed.download(tmp_path / "session.zip")
    assert len(zipfile.ZipFile(tmp_path / "session.zip").namelist()) == 2


def test_q4_archive_service_moves_session(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                          dicom_zip_factory: ZipFactory) -> None:
    zip_path, _ = dicom_zip_factory()
    landed = import_zip(session, zip_path)
    response = session.post("/data/services/archive", query={"src": landed.uri, "auto-archive": "false",
                                                              "session": "ARCH1"})
    assert response.text == f"/data/archive/projects/{P}/subjects/SUBJ1/experiments/ARCH1"
    assert xnat_emulator.prearchive_sessions(P) == []
    assert xnat_emulator.archived_sessions(P)[0].label == "ARCH1"
    again, _ = dicom_zip_factory()  # same label as an archived session of another study: CONFLICT
    assert import_zip(session, again, label="ARCH1").status == "CONFLICT"


def test_q5_prearchive_delete_and_move(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession,
                                       dicom_zip_factory: ZipFactory) -> None:
    xnat_emulator.add_project("OTHER", owner=XNAT_USER)
    first, _ = dicom_zip_factory()
    second, _ = dicom_zip_factory()
    doomed = import_zip(session, first)
    moved = import_zip(session, second, label="SESS2")
    directory = xnat_emulator.prearchive_sessions(P)[0].directory
    assert doomed.delete().status_code == 200
    assert not directory.exists()
    moved.move("OTHER")
    assert [r.folder for r in xnat_emulator.prearchive_sessions("OTHER")] == ["SESS2"]
    assert xnat_emulator.prearchive_sessions(P) == []
    with pytest.raises(XNATResponseError) as excinfo:
        session.post("/data/services/prearchive/delete", query={"src": doomed.uri})
    assert status_of(excinfo) == 404


def test_q_prearchive_of_other_projects_is_hidden(xnat_emulator: XnatEmulator, dicom_zip_factory: ZipFactory) -> None:
    xnat_emulator.add_project("OTHER", owner=XNAT_ADMIN)
    zip_path, _ = dicom_zip_factory()
    with connect(xnat_emulator, XNAT_ADMIN, XNAT_ADMIN_PASSWORD) as admin:
        landed = import_zip(admin, zip_path, project="OTHER")
    with connect(xnat_emulator) as s:
        assert s.prearchive.sessions() == []
        for call in (lambda: s.get_json("/data/prearchive/projects/OTHER"), lambda: s.get_json(landed.uri)):
            with pytest.raises(XNATResponseError) as excinfo:
                call()
            assert status_of(excinfo) == 403


# ------------------------------------------------------------------------------------------
# T1: alias tokens


def test_t1_issue_token_and_log_in_with_it(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    data = session.get_json("/data/services/tokens/issue")
    probe = requests.get(xnat_emulator.url + "/", auth=(data["alias"], data["secret"]), timeout=10)
    assert probe.status_code == 200 and probe.cookies.get("JSESSIONID")  # A1: token Basic opens a session
    assert requests.get(xnat_emulator.url + "/", auth=(data["alias"], "wrong"), timeout=10).status_code == 401
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", data["alias"])
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["secret"]) and data["xdatUserId"] == XNAT_USER
    assert data["singleUse"] is False and data["enabled"] is True and isinstance(data["estimatedExpirationTime"], int)
    xnat_emulator.clear_requests()
    with connect(xnat_emulator, data["alias"], data["secret"]) as by_token:
        assert by_token.logged_in_user == XNAT_USER
        assert [r["ID"] for r in by_token.get_json("/data/projects")["ResultSet"]["Result"]] == [P]
    # Token path: GET / with Basic alias:secret gives the JSESSIONID; no /data/services/auth call.
    assert [(r.method, r.path) for r in xnat_emulator.requests][:3] == [("GET", "/"), ("GET", "/"),
                                                                       ("GET", "/data/auth")]


def test_t1_tokens_for_others_need_admin_and_expire(xnat_emulator: XnatEmulator,
                                                    session: xnat.session.XNATSession) -> None:
    with pytest.raises(XNATResponseError) as excinfo:
        session.services.issue_token(XNAT_ADMIN)
    assert status_of(excinfo) == 403
    with connect(xnat_emulator, XNAT_ADMIN, XNAT_ADMIN_PASSWORD) as admin:
        alias, secret = admin.services.issue_token(XNAT_USER)
    with connect(xnat_emulator, alias, secret) as by_token:
        assert by_token.logged_in_user == XNAT_USER
        by_token.get(f"/data/services/tokens/invalidate/{alias}")
    with pytest.raises(XNATLoginFailedError):
        connect(xnat_emulator, alias, secret)
    xnat_emulator.token_lifetime = -1.0  # issued already expired
    expired = session.services.issue_token()
    with pytest.raises(XNATLoginFailedError):
        connect(xnat_emulator, expired.alias, expired.secret)


# ------------------------------------------------------------------------------------------
# E1, 401s, injected faults


def test_e1_unknown_route_is_404_text(session: xnat.session.XNATSession) -> None:
    with pytest.raises(XNATResponseError) as excinfo:
        session.get("/data/nothing/here")
    assert status_of(excinfo) == 404
    assert session.get("/data/nothing/here", accepted_status=[404]).headers["Content-Type"].startswith("text/plain")


def test_401_without_auth_on_every_data_and_xapi_route(xnat_emulator: XnatEmulator) -> None:
    for path in ("/data/projects", "/data/archive/projects", "/xapi/access/projects", "/data/prearchive/projects",
                 "/data/nothing", "/xapi/siteConfig/buildInfo", f"/data/projects/{P}/resources/DQR/files/a"):
        assert requests.get(xnat_emulator.url + path, timeout=10).status_code == 401, path
    assert requests.get(xnat_emulator.url + "/data/projects", auth=(XNAT_USER, "wrong"), timeout=10).status_code == 401


def test_401_after_sessions_expire_then_relogin_works(xnat_emulator: XnatEmulator,
                                                      session: xnat.session.XNATSession) -> None:
    session.get_json("/data/projects")
    xnat_emulator.expire_sessions()
    with pytest.raises(XNATResponseError) as excinfo:
        session.get_json("/data/projects")
    assert status_of(excinfo) == 401
    with connect(xnat_emulator) as fresh:
        assert fresh.get_json("/data/projects")["ResultSet"]["totalRecords"] == "1"


def test_access_projects_lists_roles(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    xnat_emulator.add_project("READ", owner=XNAT_ADMIN)
    xnat_emulator.grant("READ", XNAT_USER, "collaborator")
    xnat_emulator.add_project("HIDDEN", owner=XNAT_ADMIN)
    assert session.access_levels == {P: "owner", "READ": "collaborator"}


def test_injected_faults_and_slow_answers(xnat_emulator: XnatEmulator, session: xnat.session.XNATSession) -> None:
    xnat_emulator.inject("GET", r"/data/projects$", status=500, times=2)
    for _ in range(2):
        with pytest.raises(XNATResponseError) as excinfo:
            session.get_json("/data/projects")
        assert status_of(excinfo) == 500
    assert session.get_json("/data/projects")["ResultSet"]["totalRecords"] == "1"
    for code in (401, 403, 409):
        xnat_emulator.inject("*", r"/resources", status=code)
        with pytest.raises(XNATResponseError) as excinfo:
            session.get_json(f"/data/projects/{P}/resources")
        assert status_of(excinfo) == code
    xnat_emulator.inject("GET", r"/data/projects$", status=None, delay=0.5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        session.get("/data/projects", timeout=0.1)
    statuses = [r.status for r in xnat_emulator.requests if r.path == "/data/projects"]
    assert statuses[:3] == [500, 500, 200]


def test_stopped_emulator_refuses_connections(xnat_emulator_factory: EmulatorFactory) -> None:
    emu = xnat_emulator_factory()
    url = emu.url
    emu.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url, timeout=2)


def test_command_line_emulator_serves_until_terminated(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "dqr_xnat.sandbox.xnat_emulator", "--root", str(tmp_path), "--user", "svc:pw-1234",
         "--project", "P1", "--member", "P1:svc:member"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = re.search(r"http://127\.0\.0\.1:\d+", process.stdout.readline()).group(0)
        with connect_url(url, "svc", "pw-1234") as s:
            assert s.access_levels == {"P1": "member"}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    bad = subprocess.run([sys.executable, "-m", "dqr_xnat.sandbox.xnat_emulator", "--member", "P1"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "PROJECT:LOGIN:ROLE" in bad.stderr


def connect_url(url: str, user: str, password: str) -> xnat.session.XNATSession:
    return xnat.connect(url, user=user, password=password, no_parse_model=True, loglevel="ERROR")
