"""The inbox path is the user's whole interface from XNAT: every rule of stages/inbox.py."""

import pytest

from dqr_xnat.model import JobMode
from dqr_xnat.stages.inbox import interpret

ALLOWED = ("hospital", "research")
KNOWN = ("hospital", "research", "other")


def test_plain_csv_imports_from_default_pacs():
    req = interpret("batch.csv", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert (req.kind, req.mode, req.pacs, req.reimport, req.error) == ("csv", JobMode.IMPORT, None, False, None)
    assert req.report_base == "batch"


def test_pacs_folder_chooses_pacs_and_keeps_dir_for_report():
    req = interpret("research/2024/batch.CSV", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert req.pacs == "research"
    assert req.report_base == "research/2024/batch"


def test_preview_and_reimport_combine_with_pacs():
    req = interpret("preview/hospital/b.csv", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert (req.mode, req.pacs) == (JobMode.PREVIEW, "hospital")
    req = interpret("Reimport/b.csv", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert req.reimport and req.mode is JobMode.IMPORT


def test_pacs_not_allowed_for_project_is_an_error_not_a_fallback():
    req = interpret("other/b.csv", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert req.kind == "csv" and req.error is not None
    assert "may not use PACS 'other'" in req.error and "hospital, research" in req.error


def test_two_pacs_folders_are_an_error():
    req = interpret("hospital/research/b.csv", allowed_pacs=ALLOWED, known_pacs=KNOWN)
    assert req.error is not None and "two PACS" in req.error


@pytest.mark.parametrize("path", ["notes.txt", "b.csv.report.json", ".hidden.csv", "dir/README"])
def test_other_files_are_ignored(path):
    assert interpret(path, allowed_pacs=ALLOWED).kind == "ignored"


def test_cancel_file_targets_the_csv_in_the_same_folder():
    req = interpret("hospital/batch.csv.cancel", allowed_pacs=ALLOWED)
    assert (req.kind, req.target) == ("cancel", "hospital/batch.csv")


def test_path_is_normalised():
    req = interpret("/a//b/../batch.csv", allowed_pacs=ALLOWED)
    assert req.path == "a/batch.csv"
