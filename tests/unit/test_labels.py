"""dqrObjectIdentifier labels: subject from PatientName, session from StudyID/AccessionNumber/fallback."""

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dqr_xnat.errors import LabelError
from dqr_xnat.model import XnatLabels
from dqr_xnat.stages.labels import (
    make_labels,
    nearest_label,
    to_label_chars,
    uid_label,
    validate_label,
    validate_project,
)

LEGAL = re.compile(r"[A-Za-z0-9_-]{1,64}")
UID = "1.2.826.0.1.3680043.8.498.1"


def labels(**kw):
    args = {"patient_name": "DOE^JOHN", "study_id": "S1", "accession_number": "ACC1",
            "study_instance_uid": UID}
    args.update(kw)
    return make_labels("PROJ_1", **args)


@pytest.mark.parametrize(
    "text, label",
    [
        ("DOE^JOHN", "DOE_JOHN"),
        ("MÜLLER^HANS", "M_LLER_HANS"),
        ("O'BRIEN^PAT", "O_BRIEN_PAT"),
        ("van der Berg", "van_der_Berg"),
        ("a-b_c9", "a-b_c9"),
        ("日本", "__"),
        ("", ""),
    ],
)
def test_to_label_chars_one_underscore_per_character(text, label):
    assert to_label_chars(text) == label


@given(st.text())
def test_to_label_chars_output_is_always_legal_and_same_length(text):
    out = to_label_chars(text)
    assert len(out) == len(text)
    assert re.fullmatch(r"[A-Za-z0-9_-]*", out)


@given(st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122)))
def test_to_label_chars_keeps_legal_characters(text):
    assert all(o == t or (o == "_" and not re.fullmatch(r"[A-Za-z0-9-]", t))
               for o, t in zip(to_label_chars(text), text))


def test_dqr_example_subject_and_session():
    assert labels() == XnatLabels(project="PROJ_1", subject="DOE_JOHN", session="S1", fallback=None)


def test_relabeled_values_are_used_as_they_are():
    got = labels(patient_name="Subj001", study_id="Subj001_MR1", accession_number="Subj001_MR1")
    assert (got.subject, got.session, got.fallback) == ("Subj001", "Subj001_MR1", None)


def test_trailing_empty_name_components_do_not_change_the_subject():
    assert labels(patient_name="DOE^JOHN^^").subject == "DOE_JOHN"
    assert labels(patient_name="DOE^JOHN^^^==").subject == "DOE_JOHN"
    assert labels(patient_name=" DOE^JOHN ").subject == "DOE_JOHN"


def test_blank_study_id_falls_back_to_accession_number():
    got = labels(study_id="  ", accession_number="ACC 0101")
    assert got.session == "ACC_0101"
    assert got.fallback == "session:AccessionNumber"


def test_both_blank_fall_back_to_a_deterministic_uid_hash():
    got = labels(study_id="", accession_number="")
    expected = "study_" + hashlib.sha1(UID.encode()).hexdigest()[:10]
    assert got.session == expected
    assert got.fallback == "session:StudyInstanceUID"
    assert labels(study_id="", accession_number="").session == expected  # stable
    assert labels(study_id="", accession_number="", study_instance_uid=UID + "1").session != expected


def test_blank_name_falls_back_to_patient_id_then_uid():
    got = labels(patient_name="", patient_id="PID 0001")
    assert (got.subject, got.fallback) == ("PID_0001", "subject:PatientID")
    got = labels(patient_name="^^", patient_id="")
    assert got.subject == uid_label("subject_", UID)
    assert got.fallback == "subject:StudyInstanceUID"


def test_both_fallbacks_are_recorded():
    got = labels(patient_name="", patient_id="", study_id="", accession_number="")
    assert got.fallback == "subject:StudyInstanceUID, session:StudyInstanceUID"


def test_suffix_is_appended_to_the_session():
    assert labels(suffix="_1").session == "S1_1"
    assert labels(study_id="", accession_number="", suffix="_2").session.endswith("_2")
    assert labels(suffix="_2").subject == "DOE_JOHN"


def test_long_labels_are_cut_to_64_keeping_the_suffix():
    got = labels(patient_name="A" * 100, study_id="B" * 70, suffix="_12")
    assert got.subject == "A" * 64
    assert got.session == "B" * 61 + "_12"


def test_long_non_ascii_name_is_cut_after_mapping():
    got = labels(patient_name="Ü" * 80)
    assert got.subject == "_" * 64


@pytest.mark.parametrize("project", ["", "my project", "P/1", "P\n"])
def test_illegal_project_is_refused(project):
    with pytest.raises(LabelError, match="project ID"):
        make_labels(
            project, patient_name="A", study_id="S", accession_number="", study_instance_uid=UID)


@pytest.mark.parametrize("suffix", ["_1/", " ", "x" * 17])
def test_illegal_suffix_is_refused(suffix):
    with pytest.raises(LabelError, match="suffix"):
        labels(suffix=suffix)


def test_missing_uid_is_refused():
    with pytest.raises(LabelError, match="StudyInstanceUID"):
        labels(study_instance_uid=" ")


@given(st.text(), st.text(), st.text(), st.text(), st.sampled_from(["", "_1", "_22"]))
def test_labels_are_always_legal(name, pid, study_id, accession, suffix):
    got = labels(patient_name=name, patient_id=pid, study_id=study_id, accession_number=accession,
                 suffix=suffix)
    assert LEGAL.fullmatch(got.subject) and LEGAL.fullmatch(got.session)
    assert got.session.endswith(suffix)


def test_validate_label():
    assert validate_label("Subj_001-a", "subject") == "Subj_001-a"
    with pytest.raises(LabelError, match="subject label is empty"):
        validate_label("", "subject")
    with pytest.raises(LabelError) as err:
        validate_label("DOE^JOHN", "session")
    assert "session label 'DOE^JOHN'" in str(err.value) and "nearest legal label: 'DOE_JOHN'" in str(err.value)
    with pytest.raises(LabelError, match="65 characters long"):
        validate_label("x" * 65, "subject")


def test_nearest_label_is_never_empty():
    assert nearest_label("  ") == "_"
    assert nearest_label(" a b ") == "a_b"
    assert len(nearest_label("x" * 100)) == 64


def test_validate_project():
    assert validate_project("Proj-1_a") == "Proj-1_a"
    with pytest.raises(LabelError):
        validate_project("Proj 1")
