"""Deterministic synthetic DICOM studies for tests, the demo and benchmarks.

Why synthetic: tests must assert exact answers (which studies a query returns, how many instances
arrive), so the data must be known in advance, identical on every run and free of real PHI. Every
UID is derived from fixed inputs with :func:`pydicom.uid.generate_uid` (``entropy_srcs``), and pixel
data comes from a seeded generator, so two runs write byte-identical files.

The default catalog (:func:`default_catalog`): 6 patients, 9 studies, 265 instances. Series are
written as number/modality/instances "SeriesDescription"::

    Patient      ID      Birth    Sex | StudyDate Accession StudyID | series
    DOE^JOHN     PID0001 19600115 M   | 20230110  ACC0101   1       | 1/CT/2 "Topogram",
                                      |                             | 2/CT/30 "Chest 5mm",
                                      |                             | 990/SR/1 "Dose Report"
                                      | 20230211  ACC0102   -       | 1/MR/20 "T1 SAG",
                                      |                             | 2/MR/20 "T2 AX"
    DOE^JANE     PID0002 19610215 F   | 20000229  ACC0201   2       | 1/CT/20 "CT AC",
                                      |                             | 2/PT/20 "PET AC",
                                      |                             | 999/OT/1 "Dose Report"
    doe^lower    PID0003 19620315 M   | 19991231  ACC0301   -       | 2/CT/25 "Head 3mm"
    MÜLLER^HANS  PID0004 19630415 M   | 20240229  ACC0401   5       | 1/MR/20 "t1_mprage",
                                      |                             | 2/MR/15 "t2_tse"
                                      | 20240301  -         -       | 2/CT/20 "Abdomen 5mm"
    O'BRIEN^PAT  PID0005 20000229 F   | 20230110  ACC0501   -       | 1/MR/15 "PD FS COR"
                                      | 20230315  ACC0502   8       | 1/PT/20 "PET Brain",
                                      |                             | 2/CT/10 "CT AC"
    SMITH^ALICE  PID0006 19700101 F   | 20221231  ACC0601   9       | 2/CT/25 "Chest 1mm",
                                      |                             | 990/SR/1 "Dose Report"

("-" = present but blank.) StudyDescriptions, in order: CT CHEST, MR BRAIN, PET-CT, CT HEAD,
MRT Schädel, CT Abdomen, MR KNEE, PET BRAIN, CT CHEST.

Things tests rely on:

* ``DOE*`` matches 3 studies (DOE^JOHN x2, DOE^JANE) case-sensitively, 4 with ``doe^lower`` when
  the PACS matches names case-insensitively.
* Two studies share StudyDate 20230110 (DOE^JOHN and O'BRIEN^PAT); ``ACC01*`` matches two studies.
* Blank StudyID: ACC0102, ACC0301, ACC0501 and the MÜLLER CT; that CT also has a blank
  AccessionNumber, so it has neither (the session-label fallback case).
* Only MÜLLER^HANS is non-ASCII: his instances carry ``SpecificCharacterSet = ISO_IR 192``
  (so does his study description "MRT Schädel"); everyone else's carry none (default repertoire).
* ModalitiesInStudy: MR appears in ACC0102, ACC0401, ACC0501 only; PT in ACC0201, ACC0502 only.
* "Dose Report" series: X-Ray Radiation Dose SR (modality SR, no pixels) in ACC0101 and ACC0601, a
  Secondary Capture (modality OT) in ACC0201: to test series filters and C-GET of non-image classes.
* OtherPatientIDsSequence: every instance of DOE^JOHN and MÜLLER^HANS holds one; its first item
  repeats the real PatientID (what relabeling must not leak), the second an old ID "X" + PatientID.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

#: Fixed root for every UID we derive (pydicom's registered root; 2.25 would also do).
UID_ROOT = "1.2.826.0.1.3680043.8.498."

#: SOP class written for each modality.
SOP_CLASSES: dict[str, UID] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
    "OT": SecondaryCaptureImageStorage,
    "SR": XRayRadiationDoseSRStorage,
}

#: Image size for the benchmark load (pass as ``rows=``/``columns=`` to :func:`write_studies`).
BENCH_MATRIX = 256


@dataclass(frozen=True)
class SyntheticSeries:
    """One series; ``instances`` is the number of instances it holds."""

    uid: str
    number: int
    modality: str
    description: str
    instances: int

    def sop_instance_uids(self) -> tuple[str, ...]:
        """The SOPInstanceUIDs written for this series, in InstanceNumber order (1-based)."""
        return tuple(_uid("sop", self.uid, str(n)) for n in range(1, self.instances + 1))


@dataclass(frozen=True)
class SyntheticStudy:
    """One study of one patient, as written to every file of the study."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_uid: str
    accession: str
    study_id: str
    study_date: str
    study_time: str
    description: str
    series: tuple[SyntheticSeries, ...]
    other_patient_ids: bool = False  # write OtherPatientIDsSequence on every instance

    @property
    def instances(self) -> int:
        """Total number of instances over all series."""
        return sum(s.instances for s in self.series)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Sorted distinct modalities: what a PACS should return as ModalitiesInStudy."""
        return tuple(sorted({s.modality for s in self.series}))

    @property
    def non_ascii(self) -> bool:
        """True when a text value needs ISO_IR 192 (UTF-8) to be encoded."""
        return not all(v.isascii() for v in (self.patient_name, self.description))

    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(uid for s in self.series for uid in s.sop_instance_uids())


def _uid(*parts: str) -> str:
    """A UID that depends only on ``parts`` (so every run writes the same UIDs)."""
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["dqr-xnat-sandbox", *parts]))


def _study(
    patient: tuple[str, str, str, str],
    accession: str,
    study_id: str,
    date: str,
    description: str,
    series: Iterable[tuple[int, str, int, str]],
    *,
    key: str,
    time: str = "101500",
    other_ids: bool = False,
) -> SyntheticStudy:
    """Build one study; ``key`` (not the accession, which may be blank) seeds its UIDs."""
    name, pid, birth, sex = patient
    study_uid = _uid("study", key)
    return SyntheticStudy(
        patient_name=name,
        patient_id=pid,
        birth_date=birth,
        sex=sex,
        study_uid=study_uid,
        accession=accession,
        study_id=study_id,
        study_date=date,
        study_time=time,
        description=description,
        series=tuple(
            SyntheticSeries(_uid("series", study_uid, str(num)), num, mod, desc, count)
            for num, mod, count, desc in series
        ),
        other_patient_ids=other_ids,
    )


def default_catalog() -> list[SyntheticStudy]:
    """The 9 studies of the module docstring table, in that order."""
    john = ("DOE^JOHN", "PID0001", "19600115", "M")
    jane = ("DOE^JANE", "PID0002", "19610215", "F")
    lower = ("doe^lower", "PID0003", "19620315", "M")
    hans = ("MÜLLER^HANS", "PID0004", "19630415", "M")
    pat = ("O'BRIEN^PAT", "PID0005", "20000229", "F")
    alice = ("SMITH^ALICE", "PID0006", "19700101", "F")
    dose = (990, "SR", 1, "Dose Report")
    return [
        _study(john, "ACC0101", "1", "20230110", "CT CHEST",
               [(1, "CT", 2, "Topogram"), (2, "CT", 30, "Chest 5mm"), dose],
               key="john-1", other_ids=True),
        _study(john, "ACC0102", "", "20230211", "MR BRAIN",
               [(1, "MR", 20, "T1 SAG"), (2, "MR", 20, "T2 AX")],
               key="john-2", time="083000", other_ids=True),
        _study(jane, "ACC0201", "2", "20000229", "PET-CT",
               [(1, "CT", 20, "CT AC"), (2, "PT", 20, "PET AC"), (999, "OT", 1, "Dose Report")],
               key="jane-1"),
        _study(lower, "ACC0301", "", "19991231", "CT HEAD", [(2, "CT", 25, "Head 3mm")],
               key="lower-1", time="235959"),
        _study(hans, "ACC0401", "5", "20240229", "MRT Schädel",
               [(1, "MR", 20, "t1_mprage"), (2, "MR", 15, "t2_tse")],
               key="hans-1", other_ids=True),
        _study(hans, "", "", "20240301", "CT Abdomen", [(2, "CT", 20, "Abdomen 5mm")],
               key="hans-2", time="000000", other_ids=True),
        _study(pat, "ACC0501", "", "20230110", "MR KNEE", [(1, "MR", 15, "PD FS COR")],
               key="pat-1", time="142000"),
        _study(pat, "ACC0502", "8", "20230315", "PET BRAIN",
               [(1, "PT", 20, "PET Brain"), (2, "CT", 10, "CT AC")],
               key="pat-2"),
        _study(alice, "ACC0601", "9", "20221231", "CT CHEST",
               [(2, "CT", 25, "Chest 1mm"), dose],
               key="alice-1"),
    ]  # fmt: skip


def bench_catalog(studies: int = 20, series: int = 3, instances: int = 100) -> list[SyntheticStudy]:
    """A larger, regular load for benchmarks: ``studies`` x ``series`` x ``instances``.

    Two studies per patient (BENCH^Pnnn / BPIDnnn), accession BACCnnnn, modalities cycling
    CT, MR, PT per series. Write it with ``rows=columns=BENCH_MATRIX`` for a realistic size.
    """
    modalities = ("CT", "MR", "PT")
    out = []
    for i in range(studies):
        p = i // 2
        patient = (f"BENCH^P{p:03d}", f"BPID{p:03d}", f"19{50 + p % 50:02d}0101", "MF"[p % 2])
        date = f"2022{1 + i % 12:02d}{1 + i % 28:02d}"
        out.append(
            _study(patient, f"BACC{i:04d}", str(i + 1), date, f"BENCH STUDY {i}",
                   [(s + 1, modalities[s % 3], instances, f"Bench series {s + 1}")
                    for s in range(series)],
                   key=f"bench-{i}")
        )  # fmt: skip
    return out


def find(catalog: Iterable[SyntheticStudy], **criteria: object) -> list[SyntheticStudy]:
    """Studies whose fields equal every given value, e.g. ``find(cat, patient_id="PID0001")``."""
    known = {f.name for f in fields(SyntheticStudy)}
    unknown = set(criteria) - known
    if unknown:
        raise TypeError(f"unknown SyntheticStudy field(s): {sorted(unknown)}")
    return [s for s in catalog if all(getattr(s, k) == v for k, v in criteria.items())]


# --------------------------------------------------------------------------------------------
# Writing


def write_studies(
    studies: Iterable[SyntheticStudy],
    directory: Path,
    *,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
) -> list[Path]:
    """Write every instance as a Part-10 file (Explicit VR LE); return the paths in catalog order.

    Layout: ``directory/study<NN>/series<NNN>/<NNNN>.dcm`` (no DICOM values in names). Pixel data
    is seeded random 12-bit noise: incompressible, like a worst-case transfer.
    """
    directory = Path(directory)
    paths: list[Path] = []
    for index, study in enumerate(studies):
        for series in study.series:
            folder = directory / f"study{index:02d}" / f"series{series.number:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for number, ds in enumerate(_instances(study, series, rows, columns, seed), start=1):
                path = folder / f"{number:04d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
    return paths


def _instances(
    study: SyntheticStudy, series: SyntheticSeries, rows: int, columns: int, seed: int
) -> Iterator[Dataset]:
    for number, sop_uid in enumerate(series.sop_instance_uids(), start=1):
        ds = _header(study, series, number, sop_uid)
        if series.modality == "SR":
            _add_dose_sr(ds, study)
        else:
            _add_image(ds, series, number, rows, columns, seed)
        yield ds


def _header(study: SyntheticStudy, series: SyntheticSeries, number: int, sop_uid: str) -> Dataset:
    """Patient, study, series, equipment and SOP common modules, as a modality would write them."""
    sop_class = SOP_CLASSES[series.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if study.non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = study.study_date, study.study_time
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "DQR-XNAT SANDBOX"
    ds.InstitutionName = "Sandbox Hospital"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.StationName = f"SANDBOX{series.modality}"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = "Synthetic"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.IssuerOfPatientID = "SANDBOX"
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    if study.other_patient_ids:
        ds.OtherPatientIDsSequence = Sequence(
            [_other_id(study.patient_id, "SANDBOX"), _other_id("X" + study.patient_id, "OLDHOSP")]
        )
    ds.PatientAge = f"{int(study.study_date[:4]) - int(study.birth_date[:4]):03d}Y"
    ds.ProtocolName = series.description
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = number
    return ds


def _other_id(patient_id: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID = patient_id
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


def _add_image(
    ds: Dataset, series: SyntheticSeries, number: int, rows: int, columns: int, seed: int
) -> None:
    """Image plane, image pixel and a few modality-specific attributes; 16-bit, 12 stored."""
    original = series.modality != "OT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if original else ["DERIVED", "SECONDARY"]
    ds.FrameOfReferenceUID = _uid("for", ds.StudyInstanceUID)
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [-100.0, -100.0, float(number * 5)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = float(number * 5)
    ds.SliceThickness = 5.0
    ds.PixelSpacing = [0.8, 0.8]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 1024, 2048
    if series.modality == "CT":
        ds.KVP = 120
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    elif series.modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 500.0, 15.0, 3.0
    elif series.modality == "PT":
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    elif series.modality == "OT":
        ds.ConversionType = "WSD"
    ds.PixelData = _pixels(rows * columns, f"{seed}:{ds.SOPInstanceUID}")


def _pixels(count: int, seed: str) -> bytes:
    """``count`` little-endian 16-bit values below 4096 (BitsStored 12), from a seeded generator."""
    data = bytearray(random.Random(seed).randbytes(count * 2))
    data[1::2] = bytes(data[1::2]).translate(_LOW_NIBBLE)  # clear bits 12-15 of each value
    return bytes(data)


_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _add_dose_sr(ds: Dataset, study: SyntheticStudy) -> None:
    """A minimal X-Ray Radiation Dose SR (TID 10011 root, one numeric item): no pixel data."""
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "10011"
    ds.ContentTemplateSequence = Sequence([template])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    measured = Dataset()
    measured.NumericValue = "412.5"
    measured.MeasurementUnitsCodeSequence = Sequence([_code("mGy.cm", "UCUM", "mGy.cm")])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "NUM"
    item.ConceptNameCodeSequence = Sequence(
        [_code("113813", "DCM", "CT Dose Length Product Total")]
    )
    item.MeasuredValueSequence = Sequence([measured])
    ds.ContentSequence = Sequence([item])
