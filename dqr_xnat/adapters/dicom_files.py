"""DICOM file IO for the pure stages: relabel a file, read a header, zip a study.

Relabeling uses the splice of pacs-notes §7 (method C): read the header only
(``stop_before_pixels``), relabel it, write it, then copy the raw bytes from (7FE0,0010) to the
end of the file unchanged. Pixel data is never decoded nor held in memory, and the transfer
syntax, file meta and preamble are kept, which is valid for every transfer syntax, encapsulated
ones included. Exception: Deflated Explicit VR Little Endian compresses the whole dataset, so
there is no raw tail to copy; such a file (rare, and one instance at a time) is read whole and
written again deflated. A file without pixel data simply has an empty tail. A file without a
transfer syntax in its file meta is refused: the storage SCP always writes Part-10 files, so such
a file did not come from a PACS through us.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

from pydicom import dcmread
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dqr_xnat.errors import RelabelError
from dqr_xnat.stages.relabel import relabel_dataset

#: What :func:`read_study_values` returns, always every key ("" when absent).
STUDY_VALUE_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "StudyID",
    "AccessionNumber",
    "StudyInstanceUID",
    "StudyDate",
    "PatientBirthDate",
    "Modality",
    "SeriesInstanceUID",
    "SeriesDescription",
    "SOPInstanceUID",
)

_COPY_CHUNK = 1024 * 1024


def _read_header(src: Path, fp: Path | BinaryIO, **kwargs: Any) -> FileDataset:
    try:
        return dcmread(fp, **kwargs)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise RelabelError(f"{src.name}: not a readable DICOM file ({exc})") from exc


def relabel_file(src: Path, dst: Path, plan: Mapping[str, str]) -> None:
    """Write ``src`` relabeled by ``plan`` to ``dst`` (which may be ``src``), atomically.

    An empty plan copies the file byte for byte.

    Raises
    ------
    RelabelError
        ``src`` is not a Part-10 DICOM file, or a plan value does not fit its attribute.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    try:
        if not plan:
            shutil.copyfile(src, tmp)
        else:
            _relabel_to(src, tmp, plan)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _relabel_to(src: Path, tmp: Path, plan: Mapping[str, str]) -> None:
    with open(src, "rb") as fp:
        ds = _read_header(src, fp, stop_before_pixels=True)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is None:
            raise RelabelError(
                f"{src.name}: not a DICOM Part-10 file (its file meta has no transfer syntax)"
            )
        if syntax == DeflatedExplicitVRLittleEndian:
            ds = _read_header(src, src)  # whole dataset: the deflate stream has no raw tail
            tail = None
        else:
            tail = fp.tell()
        relabel_dataset(ds, plan)
        with open(tmp, "wb") as out:
            ds.save_as(out, enforce_file_format=False)
            if tail is not None:
                fp.seek(tail)
                shutil.copyfileobj(fp, out, _COPY_CHUNK)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def read_study_values(path: Path) -> dict[str, str]:
    """The identifying values of one instance, decoded with its SpecificCharacterSet.

    Only the header elements named in :data:`STUDY_VALUE_KEYWORDS` are read; absent ones are "".
    """
    path = Path(path)
    ds = _read_header(path, path, stop_before_pixels=True, specific_tags=list(STUDY_VALUE_KEYWORDS))
    return {key: _as_text(ds.get(key)) for key in STUDY_VALUE_KEYWORDS}


def _arcname(path: Path, used: set[str]) -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.name) or "instance.dcm"
    candidate, n = name, 1
    while candidate in used:
        candidate, n = f"{n}_{name}", n + 1
    used.add(candidate)
    return candidate


def zip_study(files: Iterable[Path], zip_path: Path) -> int:
    """Store ``files`` uncompressed in a new zip at ``zip_path`` (atomically); return the count.

    Each file is streamed into the archive (ZIP_STORED: DICOM pixel data rarely compresses and
    XNAT unpacks faster), so a study is never held in memory. Entry names are the files' own
    names, made safe and unique; the archive is flat.
    """
    zip_path = Path(zip_path)
    tmp = zip_path.with_name(zip_path.name + ".part")
    used: set[str] = set()
    count = 0
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, strict_timestamps=False) as zf:
            for path in files:
                zf.write(path, _arcname(Path(path), used))
                count += 1
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
