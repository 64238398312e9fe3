from __future__ import annotations

import datetime as dt
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Series, Study
from db.session import make_engine, make_sessionmaker, upgrade
from dicom_node.config import Orientation, Rule, Settings, load_settings
from dicom_node.index import stored_record_from_file, write_batch
from dicom_node.records import AssociationOpened, IndexRecord
from dicom_node.routing import (
    SeriesCandidate,
    assembler_quiet_seconds,
    explain,
    match_rule,
    matched,
    mismatch_reason,
    orientation_of,
    route,
    select_series,
)
from dicom_node.storage import InstanceKey, Spool
from dicom_node.synthetic import AXIAL, CORONAL, generate_series

STUDY_UID = "1.2.826.0.1.3680043.10.1234.1"
NOW = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
PACS = {"name": "pacs", "host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"}


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade(url)
    return make_sessionmaker(make_engine(url))


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", fsync=False)


def add_series(
    spool: Spool,
    sessions: sessionmaker[Session],
    *,
    number: int,
    modality: str = "CT",
    orientation: tuple[float, ...] = AXIAL,
    num_slices: int = 4,
    description: str | None = None,
    calling_ae: str | None = None,
    study_uid: str = STUDY_UID,
    received_at: dt.datetime = NOW,
    study_date: str | None = None,
) -> str:
    """Generate a small series, spool it, and index it as the receiver would (received at
    ``received_at``; the StudyDate ``study_date`` when given)."""
    series = generate_series(
        modality=modality,
        num_slices=num_slices,
        rows=16,
        columns=16,
        orientation=orientation,
        uid_seed=f"routing-{number}",
        study_instance_uid=study_uid,
        series_description=description,
    )
    records: list[IndexRecord] = []
    association_id = None
    if calling_ae is not None:
        association_id = f"assoc-{number}"
        records.append(
            AssociationOpened(
                association_id, calling_ae, "DICOMNODE", "127.0.0.1", 5000, True, None, received_at
            )
        )
    for dataset in series.datasets:
        dataset.SeriesNumber = number
        if study_date is not None:
            dataset.StudyDate = study_date
        key = InstanceKey.checked(
            dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
        )
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        path, _ = spool.write(key, [buffer.getvalue()])
        records.append(stored_record_from_file(path, received_at, association_id))
    with sessions.begin() as session:
        write_batch(session, records)
    return series.series_instance_uid


def study_id(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return session.scalars(select(Study.id)).one()


def settings_with(*rules: dict[str, Any], quiet: float = 60.0) -> Settings:
    return load_settings(None, destinations=[PACS], rules=list(rules), study_quiet_seconds=quiet)


def rule(**fields: Any) -> Rule:
    return Rule.model_validate({"name": "r", "pipeline": ["gaussian"], **fields})


def candidate(**fields: Any) -> SeriesCandidate:
    values: dict[str, Any] = {
        "series_id": 1,
        "study_id": 1,
        "series_instance_uid": "1.2.3",
        "series_number": 1,
        "modality": "CT",
        "series_description": "Thorax 1.0 B31f",
        "num_instances": 100,
        "calling_ae_titles": ("CT1",),
        "orientation": Orientation.AXIAL,
        "tags": {
            "Modality": ("CT",),
            "SeriesDescription": ("Thorax 1.0 B31f",),
            "BodyPartExamined": ("CHEST",),
            "SliceThickness": ("1.0",),
            "SeriesNumber": ("3",),
            "ImageType": ("ORIGINAL", "PRIMARY", "AXIAL"),
            "PatientID": ("SECRET-123",),
            "StationName": ("not-a-number",),
        },
    }
    values.update(fields)
    return SeriesCandidate(**values)


# -- match types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"Modality": "CT"}, True),
        ({"Modality": "MR"}, False),
        ({"Modality": "ct"}, False),  # exact is case-sensitive
        ({"SeriesNumber": 3}, True),  # a number compares numerically
        ({"SeriesNumber": 3.5}, False),
        ({"Modality": ["MR", "CT"]}, True),
        ({"Modality": ["MR", "PT"]}, False),
        ({"BodyPartExamined": ["THORAX", "CHEST"], "Modality": "CT"}, True),
        ({"BodyPartExamined": ["THORAX", "CHEST"], "Modality": "MR"}, False),  # AND
        ({"SeriesDescription": {"regex": "(?i)thorax"}}, True),
        ({"SeriesDescription": {"regex": "thorax"}}, False),
        ({"SeriesDescription": {"regex": "^B31f"}}, False),  # search, anchors honoured
        ({"SliceThickness": {"min": 0.5, "max": 1.0}}, True),  # inclusive
        ({"SliceThickness": {"min": 1.5}}, False),
        ({"SliceThickness": {"max": 0.9}}, False),
        ({"StationName": {"min": 0}}, False),  # not a number
        ({"ImageType": "AXIAL"}, True),  # any value of a multi-valued element
        ({"ImageType": "LOCALIZER"}, False),
        ({"ImageType": {"regex": r"^ORIGINAL\\PRIMARY\\"}}, True),  # the whole value
        ({"Manufacturer": "Siemens"}, False),  # absent
        ({}, True),
    ],
)
def test_every_match_type(match: dict[str, Any], expected: bool) -> None:
    assert match_rule(rule(match=match), candidate(), "CT1") is expected


def test_reasons_name_the_failing_condition_and_hide_patient_values() -> None:
    reason = mismatch_reason(rule(match={"Modality": "MR"}), candidate())
    assert reason == "Modality 'CT' does not match 'MR'"
    reason = mismatch_reason(rule(match={"Manufacturer": {"regex": "GE"}}), candidate())
    assert reason is not None and "Manufacturer is absent" in reason
    reason = mismatch_reason(rule(match={"PatientID": {"regex": "^X"}}), candidate())
    assert reason is not None and "PatientID" in reason and "SECRET" not in reason
    reason = mismatch_reason(rule(min_instances=200), candidate())
    assert reason == "100 instances, fewer than min_instances 200"


def test_explain_checks_every_criterion_and_the_first_failure_is_the_reason() -> None:
    checked = rule(
        calling_ae_titles=["CT1"],
        match={"Modality": "MR", "BodyPartExamined": "CHEST", "Manufacturer": "GE"},
        min_instances=200,
        orientation="coronal",
    )
    checks = explain(checked, candidate(), "CT1")
    assert [(c.criterion, c.passed) for c in checks] == [
        ("calling_ae_titles", True),
        ("match.Modality", False),
        ("match.BodyPartExamined", True),
        ("match.Manufacturer", False),
        ("min_instances", False),
        ("orientation", False),
    ]
    modality = checks[1]
    assert (modality.wanted, modality.seen) == ("'MR'", "CT")
    assert modality.reason == mismatch_reason(checked, candidate(), "CT1")
    assert checks[3].reason == "Manufacturer is absent (wanted 'GE')" and checks[3].seen is None
    assert (checks[4].wanted, checks[4].seen) == (">= 200", "100")
    assert (checks[5].wanted, checks[5].seen) == ("coronal", "axial")
    assert all(check.reason is None for check in checks if check.passed)
    assert explain(rule(enabled=False), candidate())[0].criterion == "enabled"


@pytest.mark.parametrize(
    "condition", ["SECRET-123", {"regex": "^SECRET"}, ["OTHER", "SECRET-123"], "NOT-THIS-ONE"]
)
def test_explain_never_shows_patient_values_nor_the_rules_own(condition: Any) -> None:
    """Neither the series' value of a patient attribute or person name nor the rule's
    condition on it appears: only whether it matched."""
    series = candidate(
        tags={**candidate().tags, "ReferringPhysicianName": ("DR^WHO",), "PatientName": ("DOE",)}
    )
    for keyword in ("PatientID", "ReferringPhysicianName", "PatientBirthDate"):
        [check, _count] = explain(rule(match={keyword: condition}), series)
        assert check.wanted is None and check.seen is None
        text = repr(check.as_dict()) + str(
            mismatch_reason(rule(match={keyword: condition}), series)
        )
        for secret in ("SECRET", "OTHER", "NOT-THIS", "DR^WHO"):
            assert secret not in text
        assert keyword in (check.reason or keyword)
    assert explain(rule(match={"PatientID": "NOT-THIS-ONE"}), series)[0].reason == (
        "PatientID does not match"
    )
    assert explain(rule(match={"PatientBirthDate": "19700101"}), series)[0].reason == (
        "PatientBirthDate is absent"
    )


def test_disabled_unreadable_and_non_image_series_are_left_out() -> None:
    assert mismatch_reason(rule(enabled=False), candidate()) == "the rule is disabled"
    unreadable = candidate(header_error="FileNotFoundError: gone", is_image=False)
    assert "cannot be read" in (mismatch_reason(rule(), unreadable) or "")
    report = candidate(is_image=False, orientation=None)
    assert "not an image series" in (mismatch_reason(rule(), report) or "")


def test_calling_ae_rules() -> None:
    from_ct1 = rule(calling_ae_titles=["CT1", "CT2"])
    assert match_rule(from_ct1, candidate(), "CT1")
    assert match_rule(from_ct1, candidate(), "CT2 ")
    assert match_rule(from_ct1, candidate(), ["MR1", "CT2"])  # any of the senders
    assert not match_rule(from_ct1, candidate(), "MR1")
    assert not match_rule(from_ct1, candidate(), None)  # unknown sender
    assert mismatch_reason(from_ct1, candidate(), "MR1") == "sent by MR1, not by CT1, CT2"
    assert match_rule(rule(), candidate(), None)  # no calling_ae_titles: anyone


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        (AXIAL, Orientation.AXIAL),
        (CORONAL, Orientation.CORONAL),
        (SAGITTAL, Orientation.SAGITTAL),
        ((1.0, 0.0, 0.0, 0.0, 0.9848, -0.1736), Orientation.AXIAL),  # 10 degrees tilt
        ((1.0, 0.0, 0.0, 0.0, 0.7660, -0.6428), Orientation.AXIAL),  # 40 degrees tilt
        ((0.7071, -0.7071, 0.0, 0.4082, 0.4082, -0.8165), None),  # double oblique
        (None, None),
        ((1.0, 0.0, 0.0), None),
        ((float("nan"), 0.0, 0.0, 0.0, 1.0, 0.0), None),
        ((1.0, 0.0, 0.0, 1.0, 0.0, 0.0), None),  # degenerate: no normal
    ],
)
def test_orientation_of(iop: tuple[float, ...] | None, expected: Orientation | None) -> None:
    assert orientation_of(iop) is expected


# -- against the database and the spool ------------------------------------------------------


def test_select_series_reads_orientation_counts_and_senders(
    spool: Spool, sessions: sessionmaker[Session]
) -> None:
    axial = add_series(spool, sessions, number=2, num_slices=5, calling_ae="CT1")
    coronal = add_series(spool, sessions, number=1, orientation=CORONAL, num_slices=3)
    with sessions() as session:
        candidates = select_series(study_id(sessions), session)
    assert [c.series_instance_uid for c in candidates] == [coronal, axial]
    first, second = candidates
    assert (first.orientation, first.num_instances, first.calling_ae_titles) == (
        Orientation.CORONAL,
        3,
        (),
    )
    assert (second.orientation, second.num_instances, second.calling_ae_titles) == (
        Orientation.AXIAL,
        5,
        ("CT1",),
    )
    assert second.tags["Modality"] == ("CT",)
    assert second.tags["ImageType"] == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert second.tags["InstanceNumber"] == ("1",)  # the first instance was read
    assert second.is_image and second.header_error is None


def test_route_selects_axial_series_with_enough_slices(
    spool: Spool, sessions: sessionmaker[Session]
) -> None:
    axial = add_series(spool, sessions, number=1, num_slices=5)
    coronal = add_series(spool, sessions, number=2, orientation=CORONAL, num_slices=5)
    short = add_series(spool, sessions, number=3, num_slices=2)
    settings = settings_with(
        {
            "name": "ct-axial",
            "match": {"Modality": "CT"},
            "orientation": "axial",
            "min_instances": 4,
            "pipeline": ["gaussian", "features"],
            "params": {"gaussian": {"sigma_mm": 1.5}},
            "destinations": ["pacs"],
        }
    )
    with sessions() as session:
        decisions = route(settings, session, study_id(sessions))
    by_series = {d.series_instance_uid: d for d in decisions}
    assert by_series[axial].matched and by_series[axial].reason is None
    assert by_series[coronal].reason == "orientation is coronal, not axial"
    assert by_series[short].reason == "2 instances, fewer than min_instances 4"
    [taken] = matched(decisions)
    assert taken.series_instance_uid == axial
    assert taken.pipeline == ("gaussian", "features")
    assert taken.rule.step_params("gaussian") == {"sigma_mm": 1.5}
    assert [d.name for d in taken.destinations] == ["pacs"]
    assert taken.destinations[0].max_attempts == 10
    assert taken.log_fields()["rule"] == "ct-axial"


def test_route_orders_by_priority_then_series_number(
    spool: Spool, sessions: sessionmaker[Session]
) -> None:
    add_series(spool, sessions, number=7)
    add_series(spool, sessions, number=3, modality="MR", description="T1 MPRAGE brain")
    settings = settings_with(
        {"name": "low", "pipeline": ["features"]},
        {"name": "high", "priority": 10, "pipeline": ["features"]},
        {"name": "also-low", "pipeline": ["features"]},
        {"name": "off", "enabled": False, "priority": 99, "pipeline": ["features"]},
    )
    with sessions() as session:
        decisions = route(settings, session, study_id(sessions))
    order = [(d.rule_name, d.series_number) for d in decisions]
    assert order == [
        ("off", 3),
        ("off", 7),
        ("high", 3),
        ("high", 7),
        ("low", 3),
        ("also-low", 3),
        ("low", 7),
        ("also-low", 7),
    ]
    assert [d.matched for d in decisions[:2]] == [False, False]
    assert all(d.matched for d in decisions[2:])


def test_route_calling_ae_and_regex_rules_against_the_database(
    spool: Spool, sessions: sessionmaker[Session]
) -> None:
    ct = add_series(spool, sessions, number=1, calling_ae="CT_RESEARCH")
    mr = add_series(
        spool, sessions, number=2, modality="MR", description="t1_mprage_BRAIN", calling_ae="MR1"
    )
    unknown = add_series(spool, sessions, number=3)  # no association: sender unknown
    settings = settings_with(
        {
            "name": "research",
            "calling_ae_titles": ["CT_RESEARCH", "MR_RESEARCH"],
            "pipeline": ["features"],
        },
        {
            "name": "mr-brain",
            "match": {"Modality": "MR", "SeriesDescription": {"regex": "(?i)brain|head"}},
            "pipeline": ["median"],
        },
    )
    with sessions() as session:
        decisions = route(settings, session, study_id(sessions))
    taken = {(d.rule_name, d.series_instance_uid) for d in matched(decisions)}
    assert taken == {("research", ct), ("mr-brain", mr)}
    reasons = {(d.rule_name, d.series_instance_uid): d.reason for d in decisions}
    assert reasons[("research", mr)] == "sent by MR1, not by CT_RESEARCH, MR_RESEARCH"
    assert reasons[("research", unknown)] == (
        "sent by an unknown AE, not by CT_RESEARCH, MR_RESEARCH"
    )
    assert reasons[("mr-brain", ct)] == "Modality 'CT' does not match 'MR'"


def test_per_rule_quiet_time(spool: Spool, sessions: sessionmaker[Session]) -> None:
    add_series(spool, sessions, number=1)
    settings = settings_with(
        {"name": "default", "pipeline": ["features"]},
        {"name": "slow", "quiet_seconds": 300, "pipeline": ["features"]},
        {"name": "fast", "quiet_seconds": 10, "pipeline": ["features"]},
        {"name": "fast-but-off", "enabled": False, "quiet_seconds": 1, "pipeline": ["features"]},
        quiet=60,
    )
    assert assembler_quiet_seconds(settings) == 10
    with sessions() as session:
        decisions = {d.rule_name: d for d in route(settings, session, study_id(sessions))}
    assert decisions["default"].quiet_seconds == 60
    assert decisions["slow"].not_before == NOW + dt.timedelta(seconds=300)
    assert decisions["fast"].not_before == NOW + dt.timedelta(seconds=10)


def test_unreadable_file_falls_back_to_database_tags(
    spool: Spool, sessions: sessionmaker[Session]
) -> None:
    add_series(spool, sessions, number=1, num_slices=2)
    for path in spool.iter_files():
        path.write_bytes(b"not dicom any more")
    with sessions() as session:
        [only] = select_series(study_id(sessions), session)
        assert only.header_error is not None and only.orientation is None
        assert only.tags["Modality"] == ("CT",)
        decisions = route(settings_with({"name": "r", "pipeline": ["x"]}), session, only.study_id)
    assert "cannot be read" in (decisions[0].reason or "")


def test_unknown_study_and_empty_study(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        with pytest.raises(LookupError, match="no study"):
            route(settings_with(), session, 42)
        study = Study(study_instance_uid="1.2.3", first_received_at=NOW, last_received_at=NOW)
        session.add(study)
        session.flush()
        assert select_series(study.id, session) == []
        assert session.scalars(select(Series)).all() == []
