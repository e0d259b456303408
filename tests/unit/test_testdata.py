"""The synthetic catalog is deterministic, valid Part-10, and has the edge cases it promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian

from dqr_xnat.sandbox.testdata import (
    SOP_CLASSES,
    SyntheticStudy,
    bench_catalog,
    default_catalog,
    find,
    write_studies,
)


def _files_by_name(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.dcm"))}


def test_catalog_is_identical_on_every_call() -> None:
    assert default_catalog() == default_catalog()
    assert bench_catalog(studies=3) == bench_catalog(studies=3)


def test_every_uid_is_valid_and_unique() -> None:
    catalog = default_catalog() + bench_catalog()
    uids = [s.study_uid for s in catalog]
    uids += [series.uid for s in catalog for series in s.series]
    uids += [sop for s in catalog for sop in s.sop_instance_uids()]
    assert len(uids) == len(set(uids))
    assert all(UID(u).is_valid for u in uids)


def test_same_seed_writes_byte_identical_files(tmp_path: Path) -> None:
    catalog = default_catalog()[:2]
    write_studies(catalog, tmp_path / "a")
    write_studies(catalog, tmp_path / "b")
    write_studies(catalog, tmp_path / "c", seed=1)
    a, b, c = (_files_by_name(tmp_path / x) for x in "abc")
    assert a == b and len(a) == catalog[0].instances + catalog[1].instances
    assert a.keys() == c.keys() and a != c  # the seed changes pixels only
    first = "study00/series002/0001.dcm"
    assert (
        dcmread(tmp_path / "a" / first).SOPInstanceUID
        == dcmread(tmp_path / "c" / first).SOPInstanceUID
    )


def test_catalog_summary() -> None:
    catalog = default_catalog()
    assert len(catalog) == 9 and sum(s.instances for s in catalog) == 265
    assert sorted({s.patient_name for s in catalog}) == sorted(
        ["DOE^JOHN", "DOE^JANE", "doe^lower", "MÜLLER^HANS", "O'BRIEN^PAT", "SMITH^ALICE"]
    )
    assert {s.study_date for s in catalog} >= {"19991231", "20000229", "20240229"}
    blank_id = {s.accession for s in catalog if not s.study_id}
    assert blank_id == {"ACC0102", "ACC0301", "ACC0501", ""}
    assert [s.study_id for s in find(catalog, accession="")] == [
        ""
    ]  # neither StudyID nor accession
    assert {m for s in catalog for m in s.modalities} == {"CT", "MR", "PT", "SR", "OT"}
    dose = [
        (s.accession, x.modality)
        for s in catalog
        for x in s.series
        if x.description == "Dose Report"
    ]
    assert dose == [("ACC0101", "SR"), ("ACC0201", "OT"), ("ACC0601", "SR")]
    assert len(find(catalog, study_date="20230110")) == 2


def test_find_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="accesion"):
        find(default_catalog(), accesion="ACC0101")


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[SyntheticStudy], list[Path]]:
    catalog = default_catalog()
    return catalog, write_studies(catalog, tmp_path_factory.mktemp("catalog"))


def test_files_are_part10_with_the_catalog_values(
    written: tuple[list[SyntheticStudy], list[Path]],
) -> None:
    catalog, files = written
    assert len(files) == 265
    expected = [
        (study, series)
        for study in catalog
        for series in study.series
        for _ in range(series.instances)
    ]
    for path, (study, series) in zip(files, expected, strict=True):
        assert path.read_bytes()[128:132] == b"DICM"
        ds = dcmread(path)  # no force: must be a conformant file
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (
            ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == SOP_CLASSES[series.modality]
        )
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.StudyInstanceUID == study.study_uid and ds.SeriesInstanceUID == series.uid
        assert (ds.PatientID, ds.AccessionNumber, ds.StudyID) == (
            study.patient_id,
            study.accession,
            study.study_id,
        )
        assert ds.SeriesDescription == series.description
        assert ("PixelData" in ds) == (series.modality != "SR")


def test_dcmtk_accepts_the_files(written: tuple[list[SyntheticStudy], list[Path]]) -> None:
    _, files = written
    dcmftest = shutil.which("dcmftest")
    assert dcmftest, "dcmftest (Debian dcmtk) is needed: apt-get install dcmtk"
    done = subprocess.run([dcmftest, *map(str, files[::20])], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("yes:") == len(files[::20])


def test_images_are_small_12_bit(written: tuple[list[SyntheticStudy], list[Path]]) -> None:
    _, files = written
    ds = dcmread(files[0])
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (64, 64, 16, 12)
    assert len(ds.PixelData) == 64 * 64 * 2
    assert max(ds.PixelData[1::2]) < 0x10  # high nibble clear: values below 4096


def test_non_ascii_names_decode_and_declare_utf8(
    written: tuple[list[SyntheticStudy], list[Path]],
) -> None:
    catalog, files = written
    by_patient = {dcmread(p, stop_before_pixels=True).PatientID: p for p in files}
    hans = dcmread(by_patient["PID0004"])
    assert hans.SpecificCharacterSet == "ISO_IR 192"
    assert str(hans.PatientName) == "MÜLLER^HANS"
    assert "MÜLLER^HANS".encode() in by_patient["PID0004"].read_bytes()
    ascii_only = dcmread(by_patient["PID0005"])
    assert "SpecificCharacterSet" not in ascii_only and str(ascii_only.PatientName) == "O'BRIEN^PAT"


def test_other_patient_ids_on_some_patients(
    written: tuple[list[SyntheticStudy], list[Path]],
) -> None:
    _, files = written
    holders = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        holders.setdefault(ds.PatientID, "OtherPatientIDsSequence" in ds)
        if "OtherPatientIDsSequence" in ds:
            assert [i.PatientID for i in ds.OtherPatientIDsSequence] == [
                ds.PatientID,
                "X" + ds.PatientID,
            ]
    assert {pid for pid, has in holders.items() if has} == {"PID0001", "PID0004"}


def test_bench_catalog_shape(tmp_path: Path) -> None:
    catalog = bench_catalog()
    assert len(catalog) == 20
    assert all(s.instances == 300 and len(s.series) == 3 for s in catalog)
    assert [x.modality for x in catalog[0].series] == ["CT", "MR", "PT"]
    small = bench_catalog(studies=1, series=1, instances=2)
    files = write_studies(small, tmp_path, rows=256, columns=256)
    assert len(files) == 2 and dcmread(files[0]).Rows == 256
