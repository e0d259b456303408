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

The header itself is spliced too (:func:`_write_spliced`): elements the relabel did not touch are
copied as the bytes they were read from, which is exactly what pydicom writes for them, and only
the touched ones are encoded; that halves the CPU a relabel costs. When the character set or the
byte order changes, pydicom writes the whole header.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

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
        before = {tag: ds.get_item(tag) for tag in ds.keys()}
        relabel_dataset(ds, plan)
        with open(tmp, "wb") as out:
            if tail is None or not _write_spliced(ds, before, fp, tail, out):
                ds.save_as(out, enforce_file_format=False)
            if tail is not None:
                fp.seek(tail)
                shutil.copyfileobj(fp, out, _COPY_CHUNK)


def _element_start(elem: DataElement | RawDataElement, implicit: bool) -> int | None:
    """Where the element's tag starts in the file it was read from (None if unknown)."""
    tell = elem.value_tell if isinstance(elem, RawDataElement) else elem.file_tell
    if tell is None:
        return None
    return tell - (8 if implicit or elem.VR not in EXPLICIT_VR_LENGTH_32 else 12)


def _write_spliced(ds: FileDataset, before: Mapping[BaseTag, Any], fp: BinaryIO, tail: int,
                   out: BinaryIO) -> bool:
    """Write preamble, file meta and header of the relabeled ``ds``; False if it cannot be spliced.

    Why: pydicom spends ~1.3 ms re-encoding a ~50-element header (pacs-notes §7: writing the
    header is the main cost), for the four or five elements a relabel touches. The result is the
    bytes pydicom's own writer produces (tests/unit/test_relabel.py holds it to that): an element
    left untouched is written as the raw bytes it was read from, which is what pydicom writes for
    a raw element, and retired group lengths are dropped as pydicom drops them; a touched or new
    element is encoded by pydicom's ``write_data_element``, and so is every element pydicom had
    already converted (empty ones are, on reading), since it may have been changed in place.
    Preamble and file meta are copied as received. Not when the character set or the byte order
    changes: pydicom re-encodes every text element then.
    """
    implicit, little = ds.original_encoding
    if not little or ds.original_character_set != ds._character_set:
        return False
    starts: dict[BaseTag, int] = {}
    previous = -1
    for tag, elem in sorted(before.items()):
        start = _element_start(elem, bool(implicit))
        if start is None or start <= previous:  # tag order is file order, or something is off
            return False
        starts[tag] = previous = start
    if not starts:
        return False
    order = sorted(starts)
    ends = {tag: starts[nxt] for tag, nxt in zip(order, order[1:])} | {order[-1]: tail}
    fp.seek(0)
    raw = fp.read(tail)
    if any(raw[at:at + 4] != struct.pack("<HH", tag.group, tag.element) for tag, at in starts.items()):
        return False  # a header length guessed wrong (e.g. a UN element pydicom gave its real VR)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = bool(implicit), True
    buffer.write(raw[:starts[order[0]]])
    encodings = ds.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group length: pydicom does not write it
            continue
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and elem is before.get(tag):
            buffer.write(raw[starts[tag]:ends[tag]])
        else:
            write_data_element(buffer, elem, encodings)
    out.write(buffer.getvalue())
    return True


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
