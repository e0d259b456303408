"""Shared set-up for end-to-end tests: a config wiring a real PACS fixture to the XNAT emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import yaml

from dqr_xnat.config import Config, load_config
from dqr_xnat.sandbox.pacs_servers import RunningPacs
from dqr_xnat.sandbox.xnat_emulator import XnatEmulator
from tests.fixtures.pacs import PACS_RECEIVER_AE
from tests.fixtures.xnat import XNAT_PROJECT, xnat_config_for

#: Elements relabeling may change or remove besides the planned ones (see stages/relabel.py).
RELABEL_COMPANIONS = {
    "OtherPatientIDsSequence", "OtherPatientIDs", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientNames", "SpecificCharacterSet",
}


def write_config(
    tmp_path: Path,
    pacs: RunningPacs,
    xnat: XnatEmulator,
    receiver_port: int,
    *,
    retrieve: str = "c-move",
    engine: str = "pynetdicom",
    projects: dict[str, dict[str, Any]] | None = None,
    pacs_extra: dict[str, Any] | None = None,
    service: dict[str, Any] | None = None,
) -> Path:
    """A YAML config file for one PACS fixture and the emulator; returns its path."""
    xcfg = xnat_config_for(xnat, tmp_path)
    data = {
        "xnat": {"url": xcfg.url, "user": xcfg.user, "password_file": xcfg.password_file,
                 "timeout": 60},
        "receiver": {"ae_title": PACS_RECEIVER_AE, "host": "127.0.0.1", "port": receiver_port,
                     "engine": engine},
        "pacs": {pacs.kind: {"ae_title": pacs.ae_title, "host": pacs.host, "port": pacs.port,
                             "retrieve": retrieve, "max_associations": 2, "retries": 1,
                             "retry_backoff": 0.1,
                             "timeouts": {"acse": 10, "dimse": 30, "network": 30, "connect": 5},
                             **(pacs_extra or {})}},
        "projects": projects or {XNAT_PROJECT: {"pacs": [pacs.kind]}},
        "service": {"poll_interval": 1, **(service or {})},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "dqr-xnat.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load(path: Path) -> Config:
    return load_config(path)


def source_by_sop(files: list[Path]) -> dict[str, Path]:
    """The PACS copy of each instance, by SOPInstanceUID."""
    out = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        out[str(ds.SOPInstanceUID)] = path
    return out


def assert_relabeled_copy(landed: Path, source: Path, plan: dict[str, str]) -> None:
    """Every planned element as the CSV asked; every other element and the pixels unchanged."""
    got = pydicom.dcmread(landed)
    want = pydicom.dcmread(source)
    for keyword, value in plan.items():
        assert str(got.get(keyword, "")) == value, (keyword, landed)
    for element in want:
        if element.keyword in plan or element.keyword in RELABEL_COMPANIONS:
            continue
        assert element.tag in got, (element.keyword, landed)
        if element.keyword == "PixelData":
            assert got.PixelData == want.PixelData
        else:
            assert got[element.tag].value == element.value, (element.keyword, landed)
    # The transfer syntax is the one the PACS chose to send (dcmqrscp may send Implicit VR where the
    # file was stored Explicit); that our relabeling keeps it is tested in tests/unit/test_relabel.py.
    assert not got.file_meta.TransferSyntaxUID.is_compressed
