"""Relabeling: datasets in memory and real files on disk (the splice keeps pixel bytes untouched).

Files come from pydicom's bundled test data (offline): explicit/implicit VR, big endian, RLE and
JPEG 2000 (encapsulated), deflated, and one without pixel data.
"""

import io
import shutil
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000,
    RLELossless,
    generate_uid,
)

from dqr_xnat.adapters import dicom_files
from dqr_xnat.adapters.dicom_files import STUDY_VALUE_KEYWORDS, read_study_values, relabel_file, zip_study
from dqr_xnat.errors import RelabelError
from dqr_xnat.model import RELABEL_KEYWORDS
from dqr_xnat.stages.relabel import (
    IDENTITY_COMPANIONS,
    can_encode,
    check_plan,
    check_relabel_value,
    relabel_dataset,
)

FULL_PLAN = {
    "PatientName": "Subj001",
    "PatientID": "Subj001",
    "StudyID": "Subj001_MR1",
    "AccessionNumber": "Subj001_MR1",
    "StudyDate": "20200102",
    "PatientBirthDate": "19700101",
}
REMOVED = {kw for companions in IDENTITY_COMPANIONS.values() for kw in companions}


def bundled(name: str) -> Path:
    return Path(get_testdata_file(name))


def raw_bytes_from_pixel_data(path: Path) -> bytes:
    """Everything from the (7FE0,0010) element to the end, as stored (never decoded)."""
    with open(path, "rb") as fp:
        dcmread(fp, stop_before_pixels=True)
        return fp.read()


def assert_only_planned_changes(src: Path, dst: Path, plan: dict[str, str]) -> None:
    before, after = dcmread(src), dcmread(dst)
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.file_meta == before.file_meta
    assert after.preamble == before.preamble
    for keyword, value in plan.items():
        assert keyword in after, keyword
        assert str(after[keyword].value) == value, keyword
    planned = {Tag(k) for k in plan} | {Tag(k) for k in REMOVED} | {Tag("SpecificCharacterSet")}
    for elem in before:
        if elem.tag in planned:
            continue
        assert elem.tag in after, elem.keyword
        assert after[elem.tag].value == elem.value, elem.keyword
    assert {e.tag for e in after} - {e.tag for e in before} <= planned


# --------------------------------------------------------------------------------------------
# Datasets in memory


def make_dataset(**values) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.StudyDescription = "Head"
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def test_every_planned_element_is_written():
    ds = make_dataset(PatientName="DOE^JOHN", PatientID="PID1", StudyID="1", AccessionNumber="A",
                      StudyDate="20230101", PatientBirthDate="19600101")
    relabel_dataset(ds, FULL_PLAN)
    for keyword, value in FULL_PLAN.items():
        assert str(ds[keyword].value) == value
    assert ds.StudyDescription == "Head"
    assert "SpecificCharacterSet" not in ds  # ASCII never touches the character set


def test_absent_elements_are_created_with_dictionary_vr():
    ds = make_dataset()
    relabel_dataset(ds, FULL_PLAN)
    vrs = {kw: ds[kw].VR for kw in FULL_PLAN}
    assert vrs == {"PatientName": "PN", "PatientID": "LO", "StudyID": "SH", "AccessionNumber": "SH",
                   "StudyDate": "DA", "PatientBirthDate": "DA"}


def test_empty_string_empties_but_keeps_the_element():
    ds = make_dataset(AccessionNumber="ACC1", PatientBirthDate="19600101")
    relabel_dataset(ds, {"AccessionNumber": "", "PatientBirthDate": "", "StudyID": ""})
    for keyword in ("AccessionNumber", "PatientBirthDate", "StudyID"):
        assert keyword in ds and ds[keyword].value in ("", None)


def test_keys_not_in_the_plan_are_untouched():
    ds = make_dataset(PatientName="DOE^JOHN", PatientID="PID1")
    relabel_dataset(ds, {"StudyID": "X"})
    assert (str(ds.PatientName), ds.PatientID, ds.StudyID) == ("DOE^JOHN", "PID1", "X")


def test_empty_plan_changes_nothing():
    ds = make_dataset(PatientID="PID1")
    ds.OtherPatientIDs = "OLD"
    relabel_dataset(ds, {})
    assert ds.OtherPatientIDs == "OLD" and ds.PatientID == "PID1"


def test_patient_id_relabel_removes_the_original_id_companions():
    ds = make_dataset(PatientID="PID1", PatientName="DOE^JOHN")
    item = Dataset()
    item.PatientID = "PID1-OTHER"
    item.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.OtherPatientIDs = "PID1-OLD"
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.OtherPatientNames = "DOE^J"
    relabel_dataset(ds, {"PatientID": "Subj001"})
    for keyword in IDENTITY_COMPANIONS["PatientID"]:
        assert keyword not in ds
    assert ds.OtherPatientNames == "DOE^J"  # the name was not relabeled


def test_patient_name_relabel_removes_other_patient_names():
    ds = make_dataset(PatientName="DOE^JOHN", PatientID="PID1")
    ds.OtherPatientNames = "DOE^J"
    ds.IssuerOfPatientID = "HOSPITAL"
    relabel_dataset(ds, {"PatientName": "Subj001"})
    assert "OtherPatientNames" not in ds
    assert ds.IssuerOfPatientID == "HOSPITAL"


def test_stale_group_lengths_of_changed_groups_are_removed():
    ds = make_dataset(PatientID="PID1")
    ds.add_new(0x00100000, "UL", 42)
    ds.add_new(0x00200000, "UL", 42)
    ds.add_new(0x00080000, "UL", 42)
    relabel_dataset(ds, {"PatientID": "X", "StudyID": "Y"})
    assert Tag(0x00100000) not in ds and Tag(0x00200000) not in ds
    assert Tag(0x00080000) in ds  # group 0008 untouched


def test_non_ascii_value_switches_an_ascii_dataset_to_utf8():
    ds = make_dataset(PatientName="DOE^JOHN")
    relabel_dataset(ds, {"PatientName": "MÜLLER^HANS"})
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "MÜLLER^HANS"


def test_latin1_dataset_keeps_its_charset_when_the_value_fits():
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="DOE^JOHN")
    relabel_dataset(ds, {"PatientName": "MÜLLER^HANS"})
    assert ds.SpecificCharacterSet == "ISO_IR 100"


def test_latin1_dataset_switches_to_utf8_and_keeps_other_text(tmp_path):
    # Written in Latin-1, read back raw, then relabeled with a name Latin-1 cannot encode.
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="DOE^JOHN")
    ds.StudyDescription = "Schädel"
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert b"Sch\xe4del" in (tmp_path / "a.dcm").read_bytes()
    ds = dcmread(tmp_path / "a.dcm")
    relabel_dataset(ds, {"PatientName": "Łukasz^Żółw"})
    ds.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    back = dcmread(tmp_path / "b.dcm")
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert (back.StudyDescription, str(back.PatientName)) == ("Schädel", "Łukasz^Żółw")
    assert "Schädel".encode() in (tmp_path / "b.dcm").read_bytes()


def test_can_encode():
    assert can_encode([], ["ASCII"])
    assert not can_encode([], ["Ü"])
    assert not can_encode(["ISO_IR 6"], ["Ü"])
    assert not can_encode(["ISO 2022 IR 6"], ["Ü"])
    assert not can_encode(["NOT A CHARSET"], ["Ü"])
    assert can_encode(["ISO_IR 100"], ["Ü"])
    assert not can_encode(["ISO_IR 100"], ["Ł"])
    assert can_encode(["ISO_IR 192"], ["日本"])
    assert not can_encode(["", "ISO 2022 IR 87"], ["日本"])  # code extensions: switch to UTF-8


@pytest.mark.parametrize(
    "keyword, value, problem",
    [
        ("AccessionNumber", "A" * 17, "at most 16 characters (VR SH), not 17"),
        ("StudyID", "S" * 17, "at most 16 characters"),
        ("PatientID", "P" * 65, "at most 64 characters (VR LO)"),
        ("PatientName", "N" * 65, "at most 64 characters"),
        ("PatientName", "A=B=C=D", "at most 3 component groups"),
        ("PatientName", "A^B^C^D^E^F", "at most 5 components"),
        ("PatientID", "A\\B", "one value"),
        ("AccessionNumber", "A\tB", "control characters"),
        ("StudyDate", "20230230", "real date"),
        ("StudyDate", "2023-01-01", "YYYYMMDD"),
        ("PatientBirthDate", "20230101-", "YYYYMMDD"),
        ("StudyDescription", "x", "cannot be relabeled"),
    ],
)
def test_values_that_do_not_fit_are_refused_with_a_clear_message(keyword, value, problem):
    message = check_relabel_value(keyword, value)
    assert message is not None and problem in message and keyword in message
    ds = make_dataset(PatientID="PID1")
    with pytest.raises(RelabelError, match="cannot relabel"):
        relabel_dataset(ds, {"PatientID": "NEW", keyword: value})
    assert ds.PatientID == "PID1"  # nothing changed


@pytest.mark.parametrize(
    "keyword, value",
    [("AccessionNumber", "A" * 16), ("PatientID", "P" * 64), ("PatientName", "N" * 64 + "=" + "M" * 64),
     ("PatientName", "A^B^C^D^E"), ("StudyDate", "20240229"), ("PatientName", "")],
)
def test_values_at_the_limits_are_accepted(keyword, value):
    assert check_relabel_value(keyword, value) is None


def test_check_plan_lists_every_problem():
    assert len(check_plan({"StudyID": "S" * 20, "StudyDate": "x", "PatientID": "ok"})) == 2
    assert check_plan(FULL_PLAN) == []


# --------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR LE, 258 elements, OtherPatientIDsSequence
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",  # encapsulated
        "JPEG2000.dcm",  # encapsulated, OtherPatientIDs/OtherPatientNames
        "rtplan.dcm",  # no pixel data
    ],
)
def test_file_relabel_changes_only_the_plan_and_keeps_pixel_bytes(tmp_path, name):
    src = tmp_path / name
    shutil.copyfile(bundled(name), src)
    dst = tmp_path / "out.dcm"
    relabel_file(src, dst, FULL_PLAN)
    assert_only_planned_changes(src, dst, FULL_PLAN)
    assert raw_bytes_from_pixel_data(dst) == raw_bytes_from_pixel_data(src)
    assert dcmread(src).get("PixelData") == dcmread(dst).get("PixelData")


def test_encapsulated_transfer_syntaxes_are_preserved(tmp_path):
    for name, syntax in (("MR_small_RLE.dcm", RLELossless), ("JPEG2000.dcm", JPEG2000)):
        relabel_file(bundled(name), tmp_path / name, {"PatientName": "X"})
        assert dcmread(tmp_path / name).file_meta.TransferSyntaxUID == syntax


def test_companions_are_removed_from_real_files(tmp_path):
    relabel_file(bundled("CT_small.dcm"), tmp_path / "ct.dcm", {"PatientID": "Subj001"})
    assert "OtherPatientIDsSequence" in dcmread(bundled("CT_small.dcm"))
    assert "OtherPatientIDsSequence" not in dcmread(tmp_path / "ct.dcm")
    relabel_file(bundled("JPEG2000.dcm"), tmp_path / "j.dcm", {"PatientName": "Subj001"})
    out = dcmread(tmp_path / "j.dcm")
    assert "OtherPatientNames" not in out and "OtherPatientIDs" in out


def test_deflated_file_is_rewritten_deflated(tmp_path):
    src = bundled("image_dfl.dcm")
    relabel_file(src, tmp_path / "d.dcm", FULL_PLAN)
    assert dcmread(tmp_path / "d.dcm").file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert_only_planned_changes(src, tmp_path / "d.dcm", FULL_PLAN)


def test_non_ascii_relabel_in_a_file(tmp_path):
    src = bundled("CT_small.dcm")
    assert dcmread(src).SpecificCharacterSet == "ISO_IR 100"
    relabel_file(src, tmp_path / "l.dcm", {"PatientName": "MÜLLER^HANS"})  # fits Latin-1
    assert dcmread(tmp_path / "l.dcm").SpecificCharacterSet == "ISO_IR 100"
    assert read_study_values(tmp_path / "l.dcm")["PatientName"] == "MÜLLER^HANS"
    relabel_file(src, tmp_path / "u.dcm", {"PatientName": "ŁUKASZ^Ö"})  # does not
    assert dcmread(tmp_path / "u.dcm").SpecificCharacterSet == "ISO_IR 192"
    assert read_study_values(tmp_path / "u.dcm")["PatientName"] == "ŁUKASZ^Ö"
    assert_only_planned_changes(src, tmp_path / "u.dcm", {"PatientName": "ŁUKASZ^Ö"})


def test_trailing_elements_after_pixel_data_are_kept(tmp_path):
    ds = dcmread(bundled("MR_small.dcm"))
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # DataSetTrailingPadding
    ds.save_as(tmp_path / "pad.dcm", enforce_file_format=True)
    relabel_file(tmp_path / "pad.dcm", tmp_path / "out.dcm", {"StudyID": "X"})
    out = dcmread(tmp_path / "out.dcm")
    assert out[0xFFFCFFFC].value == b"\x00" * 8
    assert out.PixelData == ds.PixelData


def test_icon_pixel_data_inside_a_sequence_does_not_stop_the_header(tmp_path):
    ds = dcmread(bundled("MR_small.dcm"))
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated = 2, 2, 8
    icon.PixelData = b"\x01\x02\x03\x04"
    ds.IconImageSequence = Sequence([icon])
    ds.save_as(tmp_path / "icon.dcm", enforce_file_format=True)
    relabel_file(tmp_path / "icon.dcm", tmp_path / "out.dcm", {"AccessionNumber": "A1"})
    out = dcmread(tmp_path / "out.dcm")
    assert out.IconImageSequence[0].PixelData == b"\x01\x02\x03\x04"
    assert out.PixelData == ds.PixelData and out.AccessionNumber == "A1"


def test_in_place_relabel(tmp_path):
    path = tmp_path / "ct.dcm"
    shutil.copyfile(bundled("CT_small.dcm"), path)
    relabel_file(path, path, {"StudyID": "NEW"})
    assert dcmread(path).StudyID == "NEW"
    assert not list(tmp_path.glob("*.part"))


def test_empty_plan_copies_byte_for_byte(tmp_path):
    relabel_file(bundled("CT_small.dcm"), tmp_path / "c.dcm", {})
    assert (tmp_path / "c.dcm").read_bytes() == bundled("CT_small.dcm").read_bytes()


def test_header_is_written_exactly_as_read_apart_from_the_plan(tmp_path):
    # The same value again must give the same bytes: nothing else is re-encoded.
    src = bundled("CT_small.dcm")
    relabel_file(src, tmp_path / "same.dcm", {"StudyID": str(dcmread(src).StudyID)})
    assert (tmp_path / "same.dcm").read_bytes() == src.read_bytes()


def test_a_file_without_file_meta_is_refused(tmp_path):
    with pytest.raises(RelabelError, match="no_meta.dcm"):
        relabel_file(bundled("no_meta.dcm"), tmp_path / "x.dcm", {"StudyID": "X"})
    assert not list(tmp_path.iterdir())


def test_not_dicom_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(RelabelError, match="not a readable DICOM file"):
        relabel_file(tmp_path / "x.txt", tmp_path / "y.dcm", {"StudyID": "X"})


def test_bad_plan_leaves_no_output(tmp_path):
    with pytest.raises(RelabelError, match="AccessionNumber"):
        relabel_file(bundled("CT_small.dcm"), tmp_path / "x.dcm", {"AccessionNumber": "A" * 20})
    assert not list(tmp_path.iterdir())


def test_read_study_values(tmp_path):
    values = read_study_values(bundled("CT_small.dcm"))
    assert set(values) == set(STUDY_VALUE_KEYWORDS)
    ds = dcmread(bundled("CT_small.dcm"))
    assert values["PatientName"] == str(ds.PatientName)
    assert values["StudyInstanceUID"] == ds.StudyInstanceUID and values["Modality"] == "CT"
    assert values["StudyID"] == ds.StudyID
    relabel_file(bundled("CT_small.dcm"), tmp_path / "r.dcm", {"AccessionNumber": ""})
    assert read_study_values(tmp_path / "r.dcm")["AccessionNumber"] == ""


def test_read_study_values_decodes_latin1(tmp_path):
    ds = make_dataset(SpecificCharacterSet="ISO_IR 100", PatientName="MÜLLER^HANS")
    ds.save_as(tmp_path / "l.dcm", enforce_file_format=True)
    assert b"M\xdcLLER" in (tmp_path / "l.dcm").read_bytes()
    assert read_study_values(tmp_path / "l.dcm")["PatientName"] == "MÜLLER^HANS"


def test_relabel_keywords_are_the_model_ones():
    assert set(FULL_PLAN) == set(RELABEL_KEYWORDS)


# --------------------------------------------------------------------------------------------
# Zip


def test_zip_study_stores_every_file_uncompressed(tmp_path):
    files = []
    for i, name in enumerate(("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")):
        path = tmp_path / f"{i}.dcm"
        shutil.copyfile(bundled(name), path)
        files.append(path)
    zip_path = tmp_path / "study.zip"
    assert zip_study(files, zip_path) == 3
    with zipfile.ZipFile(zip_path) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["0.dcm", "1.dcm", "2.dcm"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        for info, path in zip(infos, files):
            assert zf.read(info) == path.read_bytes()
    assert not (tmp_path / "study.zip.part").exists()


def test_zip_names_are_safe_and_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x y.dcm").write_bytes(d.encode())
    zip_study([tmp_path / "a" / "x y.dcm", tmp_path / "b" / "x y.dcm"], tmp_path / "s.zip")
    with zipfile.ZipFile(tmp_path / "s.zip") as zf:
        assert zf.namelist() == ["x_y.dcm", "1_x_y.dcm"]
        assert zf.read("1_x_y.dcm") == b"b"


def test_zip_of_a_missing_file_leaves_no_partial_zip(tmp_path):
    with pytest.raises(FileNotFoundError):
        zip_study([tmp_path / "missing.dcm"], tmp_path / "s.zip")
    assert not list(tmp_path.iterdir())


def _pydicom_written(src: Path, plan: dict[str, str]) -> bytes:
    """What pydicom's own writer makes of the relabeled header, plus the raw pixel tail."""
    with open(src, "rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True)
        tail = fp.read()
    relabel_dataset(ds, plan)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue() + tail


def _after_meta(data: bytes) -> bytes:
    meta = dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    return data[132 + 12 + int(meta.FileMetaInformationGroupLength):]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "rtplan.dcm", "MR_small_bigendian.dcm"])
@pytest.mark.parametrize("plan", [
    FULL_PLAN,
    {"PatientID": "P1"},  # removes the OtherPatientIDsSequence of CT_small.dcm
    {"StudyID": ""},
    {"AccessionNumber": "A" * 16, "PatientName": "O'BRIEN^PAT"},
    {"PatientName": "MÜLLER^HANS"},  # Latin-1 where the file is, UTF-8 (a full rewrite) elsewhere
], ids=["full", "patient-id", "empty", "limits", "non-ascii"])
def test_spliced_header_is_what_pydicom_writes(tmp_path, monkeypatch, name, plan):
    """The fast path copies untouched elements as read: byte for byte what pydicom would write."""
    spliced: list[bool] = []
    real = dicom_files._write_spliced

    def spy(*args, **kwargs):
        spliced.append(real(*args, **kwargs))
        return spliced[-1]

    monkeypatch.setattr(dicom_files, "_write_spliced", spy)
    src = bundled(name)
    relabel_file(src, tmp_path / "out.dcm", plan)
    written = (tmp_path / "out.dcm").read_bytes()
    assert _after_meta(written) == _after_meta(_pydicom_written(src, plan))
    assert written[:132 + 12] == src.read_bytes()[:132 + 12]  # preamble and meta as received
    charset_kept = dcmread(tmp_path / "out.dcm").get("SpecificCharacterSet") == dcmread(src).get(
        "SpecificCharacterSet")
    big_endian = name == "MR_small_bigendian.dcm"
    assert spliced == [charset_kept and not big_endian]  # the fast path ran wherever it may
    assert_only_planned_changes(src, tmp_path / "out.dcm", plan)


def test_an_element_whose_offset_cannot_be_trusted_means_a_full_write(tmp_path, monkeypatch):
    """Splicing needs every element's start: one that does not hold its tag falls back to pydicom."""
    spliced: list[bool] = []
    real = dicom_files._write_spliced
    monkeypatch.setattr(dicom_files, "_element_start", lambda elem, implicit: (
        elem.value_tell if isinstance(elem, dicom_files.RawDataElement) else elem.file_tell) - 8)
    monkeypatch.setattr(dicom_files, "_write_spliced", lambda *a, **k: spliced.append(real(*a, **k)) or spliced[-1])
    src = bundled("CT_small.dcm")  # explicit VR: the 12-byte headers of OB/SQ/UN... are now wrong
    relabel_file(src, tmp_path / "out.dcm", FULL_PLAN)
    assert spliced == [False]
    assert _after_meta((tmp_path / "out.dcm").read_bytes()) == _after_meta(_pydicom_written(src, FULL_PLAN))
