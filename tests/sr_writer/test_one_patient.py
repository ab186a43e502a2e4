"""DESIGN invariant 10: a result object is built only from sources of one patient and one study.

The sources are slices of a synthetic CT series made from a real corpus image; their Patient IDs are synthetic.
"""

from __future__ import annotations

import copy

import pytest
from pydicom.dataset import Dataset

from sr_writer import MixedSourcesError, ResultUIDs, build_result_objects
from sr_writer.context import ResultOptions
from tests.sr_writer.helpers import STUDIES, read, synthetic_result, synthetic_series

PATIENT_A = "SYNTH-PATIENT-A"
PATIENT_B = "SYNTH-PATIENT-B"
ISSUER = "SYNTH-ISSUER"

SR_ONLY = ResultOptions(gsps=False, seg=False)


@pytest.fixture(scope="module")
def template() -> Dataset:
    return read("693_UNCI.dcm")


def slices(template: Dataset, count: int = 6) -> list[Dataset]:
    """``count`` slices of one study, each with its own Patient module (elements not shared between slices)."""
    out = []
    for ds in synthetic_series(template, count, seed="one-patient"):
        for keyword in ("PatientID", "IssuerOfPatientID"):
            if keyword in ds:
                del ds[keyword]
        ds.PatientID = PATIENT_A
        out.append(ds)
    return out


def set_patient(ds: Dataset, patient_id: str | None, issuer: str | None = None) -> None:
    for keyword, value in (("PatientID", patient_id), ("IssuerOfPatientID", issuer)):
        if keyword in ds:
            del ds[keyword]
        if value is not None:
            setattr(ds, keyword, value)


def build(sources: list[Dataset]) -> list[Dataset]:
    result = synthetic_result(sources[0], STUDIES["CT693"][1])
    uids = ResultUIDs(result.study_instance_uid, result.algorithm, result.profile)
    return build_result_objects(result, sources, uids, SR_ONLY)


def refusal(sources: list[Dataset]) -> str:
    with pytest.raises(MixedSourcesError) as caught:
        build(sources)
    assert isinstance(caught.value, ValueError), "a caller error, like every other refusal of bad input"
    message = str(caught.value)
    for identifier in (PATIENT_A, PATIENT_B, ISSUER):
        assert identifier not in message, "no patient data in the message (it reaches logs and the job record)"
    return message


def test_sources_of_two_patients_are_refused_and_the_message_says_which(template: Dataset) -> None:
    sources = slices(template)
    for ds in sources[3:]:
        set_patient(ds, PATIENT_B)
    message = refusal(sources)
    assert message.startswith("sources: ")
    assert "2 different Patient IDs among 6 sources (sources 0-2 vs 3-5)" in message


def test_one_odd_source_in_the_middle_is_named(template: Dataset) -> None:
    sources = slices(template)
    set_patient(sources[2], PATIENT_B)
    assert "2 different Patient IDs among 6 sources (sources 0-1, 3-5 vs 2)" in refusal(sources)


def test_a_different_issuer_of_patient_id_is_another_patient(template: Dataset) -> None:
    sources = slices(template, 4)
    for ds in sources[:2]:
        set_patient(ds, PATIENT_A, ISSUER)
    message = refusal(sources)
    assert "2 different Issuers of Patient ID among 4 sources (sources 0-1 vs 2-3 without one)" in message
    assert "Patient IDs" not in message


def test_an_absent_patient_id_beside_a_present_one_is_a_conflict(template: Dataset) -> None:
    sources = slices(template, 3)
    set_patient(sources[0], None)
    set_patient(sources[1], "")  # empty counts as absent
    assert "2 different Patient IDs among 3 sources (sources 0-1 without one vs 2)" in refusal(sources)


def test_sources_all_without_patient_id_are_one_patient(template: Dataset) -> None:
    sources = slices(template, 3)
    for ds in sources:
        set_patient(ds, "")
    set_patient(sources[1], None)  # absent (not the first: highdicom reads the first source's Type 2 Patient ID)
    (sr,) = build(sources)
    assert sr.PatientID == ""


def test_insignificant_spaces_do_not_make_another_patient(template: Dataset) -> None:
    sources = slices(template, 2)
    set_patient(sources[1], f" {PATIENT_A} ", f"{ISSUER} ")
    set_patient(sources[0], PATIENT_A, ISSUER)
    (sr,) = build(sources)
    assert sr.PatientID == PATIENT_A


def test_one_patient_builds_as_before(template: Dataset) -> None:
    sources = slices(template)
    objects = build(sources)
    assert [ds.Modality for ds in objects] == ["SR"]
    assert objects[0].PatientID == PATIENT_A


def test_an_instance_resent_with_another_patient_is_a_conflict(template: Dataset) -> None:
    """The same SOP Instance UID twice (a corrected resend): the copies disagree, so the study is refused."""
    sources = slices(template, 2)
    resent = copy.deepcopy(sources[1])
    set_patient(resent, PATIENT_B)
    assert "(sources 0-1 vs 2)" in refusal([*sources, resent])


def test_a_source_of_another_study_is_the_same_kind_of_refusal(template: Dataset) -> None:
    sources = slices(template, 2)
    other = read("MR2_UNCI.dcm")
    with pytest.raises(MixedSourcesError, match=r"sources\[2\] belongs to another study"):
        build([*sources, other])
