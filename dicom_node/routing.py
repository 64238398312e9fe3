"""Routing: which series of a completed study go through which rule's pipeline.

Pure functions over the database rows the index wrote and the spooled files: no network,
no jobs. ``select_series`` describes each series of a study (its tags, read from one spooled
file without the pixel data, its orientation, instance count and senders); ``match_rule``
checks one rule against one series; ``route`` gives one ``RouteDecision`` per (series, rule),
matched or not, each with the reason a series was left out. See ``docs/routing.md``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Association, Instance, Series, Study, as_utc
from dicom_node.config import (
    UNMATCHABLE_VRS,
    Destination,
    MatchCondition,
    Orientation,
    RangeMatch,
    RegexMatch,
    Rule,
    Settings,
)
from dicom_node.security.crypto import load_keys, read_dicom
from dicom_node.security.keys import KeyRing

# A series' orientation is that of the patient axis its slice normal is closest to;
# the normal must be within this many degrees of that axis, otherwise it is oblique.
OBLIQUE_DEGREES = 45.0
# Values of these keywords (and of every person name) never appear in a reason, which is
# logged at INFO, nor in an explanation (``explain``), which the API answers with.
_REDACTED_PREFIXES = ("Patient", "OtherPatient", "Responsible")
_REDACTED_KEYWORDS = frozenset({"AccessionNumber", "IssuerOfPatientID"})


@dataclass(frozen=True)
class SeriesCandidate:
    """What rules are matched against: one series of a study.

    ``tags`` maps a DICOM keyword to its values as strings (several for a multi-valued
    element), read from the series' first instance (lowest InstanceNumber) and completed
    by the database row. ``orientation`` is None where it cannot be told (no image plane,
    oblique, unreadable file); ``header_error`` says why the file could not be read.
    """

    series_id: int
    study_id: int
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    num_instances: int
    calling_ae_titles: tuple[str, ...]
    orientation: Orientation | None
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    is_image: bool = True
    header_path: str | None = None
    header_error: str | None = None


@dataclass(frozen=True)
class RouteDecision:
    """One (series, rule) pair: whether the series goes through the rule, and if not, why.

    ``not_before`` is when the rule's quiet time has passed since the study's last
    instance; a dispatcher holds a matched decision until then.
    """

    study_id: int
    series_id: int
    series_instance_uid: str
    series_number: int | None
    rule: Rule
    matched: bool
    reason: str | None
    destinations: tuple[Destination, ...]
    quiet_seconds: float
    not_before: dt.datetime | None
    calling_ae_titles: tuple[str, ...] = ()

    @property
    def rule_name(self) -> str:
        return self.rule.name

    @property
    def pipeline(self) -> tuple[str, ...]:
        return self.rule.pipeline

    @property
    def priority(self) -> int:
        return self.rule.priority

    def log_fields(self) -> dict[str, Any]:
        """Fields for a structured log line (no patient data)."""
        return {
            "study_id": self.study_id,
            "series_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "rule": self.rule.name,
            "matched": self.matched,
            "reason": self.reason,
        }


# -- describing series -----------------------------------------------------------------------


def orientation_of(image_orientation: Sequence[float] | None) -> Orientation | None:
    """Axial, coronal or sagittal from ImageOrientationPatient; None if oblique or absent."""
    if image_orientation is None or len(image_orientation) != 6:
        return None
    try:
        values = [float(v) for v in image_orientation]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    rx, ry, rz, cx, cy, cz = values
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(c * c for c in normal))
    if length < 1e-6:
        return None
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) / length < math.cos(math.radians(OBLIQUE_DEGREES)):
        return None
    return (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)[axis]


def _plane_orientation(ds: Dataset) -> Sequence[float] | None:
    """ImageOrientationPatient, top level or in the functional groups (enhanced objects)."""
    if "ImageOrientationPatient" in ds:
        return list(ds.ImageOrientationPatient)
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group)
        if not items:
            continue
        planes = items[0].get("PlaneOrientationSequence")
        if planes and "ImageOrientationPatient" in planes[0]:
            return list(planes[0].ImageOrientationPatient)
    return None


def _as_strings(value: Any) -> tuple[str, ...]:
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    strings = tuple(str(item).strip() for item in items if item is not None)
    return tuple(s for s in strings if s)


def _element_values(ds: Dataset, tag: Any) -> tuple[str, tuple[str, ...]] | None:
    try:
        element = ds[tag]
        if not element.keyword or element.VR in UNMATCHABLE_VRS:
            return None
        return element.keyword, _as_strings(element.value)
    except Exception:  # a malformed element cannot be matched on; the others still can
        return None


def dataset_tags(ds: Dataset) -> dict[str, tuple[str, ...]]:
    """Every top-level text or number element of ``ds`` by keyword, values as strings."""
    tags: dict[str, tuple[str, ...]] = {}
    for tag in list(ds.keys()):
        found = _element_values(ds, tag)
        if found is not None and found[1]:
            tags[found[0]] = found[1]
    return tags


def _representative_paths(session: Session, series_ids: Sequence[int]) -> dict[int, str]:
    """The first instance (lowest InstanceNumber, then oldest row) of each series."""
    rows = session.execute(
        select(Instance.series_id, Instance.path)
        .where(Instance.series_id.in_(series_ids))
        .order_by(
            Instance.series_id,
            Instance.instance_number.is_(None),
            Instance.instance_number,
            Instance.id,
        )
    )
    paths: dict[int, str] = {}
    for series_id, path in rows:
        paths.setdefault(series_id, path)
    return paths


def _calling_ae_titles(session: Session, series_ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    rows = session.execute(
        select(Instance.series_id, Association.calling_ae_title)
        .join(Association, Instance.association_id == Association.id)
        .where(Instance.series_id.in_(series_ids))
        .distinct()
    )
    titles: dict[int, set[str]] = {}
    for series_id, title in rows:
        titles.setdefault(series_id, set()).add(title.strip())
    return {series_id: tuple(sorted(values)) for series_id, values in titles.items()}


def _database_tags(series: Series, study: Study) -> dict[str, tuple[str, ...]]:
    known: dict[str, object] = {
        "StudyInstanceUID": study.study_instance_uid,
        "StudyDate": study.study_date,
        "SeriesInstanceUID": series.series_instance_uid,
        "Modality": series.modality,
        "SeriesNumber": series.series_number,
        "SeriesDescription": series.series_description,
        "BodyPartExamined": series.body_part_examined,
    }
    return {key: _as_strings(value) for key, value in known.items() if _as_strings(value)}


def _describe_series(
    series: Series,
    study: Study,
    num_instances: int,
    titles: tuple[str, ...],
    path: str | None,
    keys: KeyRing | None,
) -> SeriesCandidate:
    tags = _database_tags(series, study)
    orientation: Orientation | None = None
    is_image = True
    error: str | None = None
    if path is None:
        error = "the series has no instances"
    else:
        try:
            ds = read_dicom(Path(path), keys, stop_before_pixels=True)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            tags.update(dataset_tags(ds))
            is_image = "Rows" in ds and "Columns" in ds
            orientation = orientation_of(_plane_orientation(ds))
    return SeriesCandidate(
        series_id=series.id,
        study_id=study.id,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        modality=series.modality,
        series_description=series.series_description,
        num_instances=num_instances,
        calling_ae_titles=titles,
        orientation=orientation,
        tags=tags,
        is_image=is_image and error is None,
        header_path=path,
        header_error=error,
    )


def _series_order(candidate: SeriesCandidate) -> tuple[bool, int, str]:
    number = candidate.series_number
    return (number is None, number or 0, candidate.series_instance_uid)


def select_series(
    study_id: int, session: Session, keys: KeyRing | None = None
) -> list[SeriesCandidate]:
    """Describe every series of the study, ordered by SeriesNumber (series without last);
    ``keys`` decrypt the spooled files when they are encrypted."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study with id {study_id}")
    series_rows = list(session.scalars(select(Series).where(Series.study_id == study_id)))
    if not series_rows:
        return []
    ids = [series.id for series in series_rows]
    counts: dict[int, int] = {
        series_id: count
        for series_id, count in session.execute(
            select(Instance.series_id, func.count(Instance.id))
            .where(Instance.series_id.in_(ids))
            .group_by(Instance.series_id)
        )
    }
    paths = _representative_paths(session, ids)
    titles = _calling_ae_titles(session, ids)
    candidates = [
        _describe_series(
            series,
            study,
            counts.get(series.id, 0),
            titles.get(series.id, ()),
            paths.get(series.id),
            keys,
        )
        for series in series_rows
    ]
    return sorted(candidates, key=_series_order)


# -- matching --------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _value_matches(condition: str | float, value: str) -> bool:
    if isinstance(condition, str):
        return value == condition.strip()
    number = _number(value)
    return number is not None and number == condition


def condition_matches(condition: MatchCondition, values: tuple[str, ...]) -> bool:
    """Whether a multi-valued element matches: one of its values, or for a regex the whole
    value as written in DICOM (values joined with backslashes), satisfies the condition."""
    if not values:
        return False
    if isinstance(condition, RegexMatch):
        pattern = condition.pattern
        return any(pattern.search(v) for v in (*values, "\\".join(values)))
    if isinstance(condition, RangeMatch):
        numbers = [n for n in map(_number, values) if n is not None]
        return any(
            (condition.min is None or n >= condition.min)
            and (condition.max is None or n <= condition.max)
            for n in numbers
        )
    if isinstance(condition, tuple):
        return any(_value_matches(option, v) for option in condition for v in values)
    return any(_value_matches(condition, v) for v in values)


def _redacted(keyword: str) -> bool:
    """Whether values of ``keyword`` are hidden: patient attributes and every person name."""
    if keyword.startswith(_REDACTED_PREFIXES) or keyword in _REDACTED_KEYWORDS:
        return True
    tag = tag_for_keyword(keyword)
    return tag is not None and dictionary_VR(tag) == "PN"


def _describe_condition(condition: MatchCondition) -> str:
    if isinstance(condition, RegexMatch):
        return f"regex {condition.regex!r}"
    if isinstance(condition, RangeMatch):
        low = "-inf" if condition.min is None else f"{condition.min:g}"
        high = "inf" if condition.max is None else f"{condition.max:g}"
        return f"range [{low}, {high}]"
    if isinstance(condition, tuple):
        return f"one of {list(condition)}"
    return repr(condition)


def _calling_titles(calling_ae: str | Collection[str] | None) -> tuple[str, ...]:
    if calling_ae is None:
        return ()
    if isinstance(calling_ae, str):
        return (calling_ae.strip(),)
    return tuple(title.strip() for title in calling_ae)


@dataclass(frozen=True)
class CriterionCheck:
    """One criterion of a rule checked against one series.

    ``criterion`` names it: ``enabled``, ``readable``, ``image``, ``calling_ae_titles``,
    ``match.<Keyword>``, ``min_instances`` or ``orientation``. ``wanted`` is what the rule
    asks and ``seen`` what the series has, both None for a patient keyword (PatientName,
    PatientID, PatientBirthDate, AccessionNumber...: their values are never shown, neither
    the series' nor the rule's). ``reason`` says why it failed; None when it passed.
    """

    criterion: str
    passed: bool
    wanted: str | None = None
    seen: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "passed": self.passed,
            "wanted": self.wanted,
            "seen": self.seen,
            "reason": self.reason,
        }


def _check(
    criterion: str, failure: str | None, wanted: str | None, seen: str | None
) -> CriterionCheck:
    return CriterionCheck(criterion, failure is None, wanted, seen, failure)


def _match_check(
    keyword: str, condition: MatchCondition, values: tuple[str, ...]
) -> CriterionCheck:
    criterion = f"match.{keyword}"
    if _redacted(keyword):
        if not values:
            return _check(criterion, f"{keyword} is absent", None, None)
        failure = None if condition_matches(condition, values) else f"{keyword} does not match"
        return _check(criterion, failure, None, None)
    wanted = _describe_condition(condition)
    if not values:
        return _check(criterion, f"{keyword} is absent (wanted {wanted})", wanted, None)
    seen = "\\".join(values)
    failure = None
    if not condition_matches(condition, values):
        failure = f"{keyword} {seen!r} does not match {wanted}"
    return _check(criterion, failure, wanted, seen)


def explain(
    rule: Rule, candidate: SeriesCandidate, calling_ae: str | Collection[str] | None = None
) -> list[CriterionCheck]:
    """Every criterion of ``rule`` checked against ``candidate``, passed or failed, in the
    order ``mismatch_reason`` reports the first failure. ``enabled``, ``readable`` and
    ``image`` appear only when they fail; the rule's own criteria always do.

    ``calling_ae``: as for ``mismatch_reason``.
    """
    checks: list[CriterionCheck] = []
    failure: str | None
    if not rule.enabled:
        checks.append(_check("enabled", "the rule is disabled", "true", "false"))
    if candidate.header_error is not None:
        failure = f"its file cannot be read ({candidate.header_error})"
        checks.append(_check("readable", failure, None, None))
    elif not candidate.is_image:
        checks.append(_check("image", "it is not an image series (no Rows/Columns)", None, None))
    if rule.calling_ae_titles is not None:
        titles = _calling_titles(calling_ae)
        sent_by = ", ".join(titles) or "an unknown AE"
        wanted = ", ".join(rule.calling_ae_titles)
        sent_by_listed = any(title in rule.calling_ae_titles for title in titles)
        failure = None if sent_by_listed else f"sent by {sent_by}, not by {wanted}"
        checks.append(_check("calling_ae_titles", failure, wanted, sent_by))
    for keyword, condition in rule.match.items():
        checks.append(_match_check(keyword, condition, candidate.tags.get(keyword, ())))
    count, least = candidate.num_instances, rule.min_instances
    failure = f"{count} instances, fewer than min_instances {least}" if count < least else None
    checks.append(_check("min_instances", failure, f">= {least}", str(count)))
    if rule.orientation is not Orientation.ANY:
        found = candidate.orientation.value if candidate.orientation else "oblique or unknown"
        wanted = rule.orientation.value
        same = candidate.orientation is rule.orientation
        failure = None if same else f"orientation is {found}, not {wanted}"
        checks.append(_check("orientation", failure, wanted, found))
    return checks


def mismatch_reason(
    rule: Rule, candidate: SeriesCandidate, calling_ae: str | Collection[str] | None = None
) -> str | None:
    """Why ``candidate`` is left out of ``rule`` (its first failed criterion, ``explain``),
    or None when the rule takes it.

    ``calling_ae`` is the sender's AE title (or the titles of every association the series
    arrived on; any one listed in the rule suffices). None: the sender is not known, which
    no rule with ``calling_ae_titles`` accepts.
    """
    for check in explain(rule, candidate, calling_ae):
        if not check.passed:
            return check.reason
    return None


def match_rule(
    rule: Rule, candidate: SeriesCandidate, calling_ae: str | Collection[str] | None = None
) -> bool:
    """Whether ``rule`` takes ``candidate``; ``mismatch_reason`` says why not."""
    return mismatch_reason(rule, candidate, calling_ae) is None


# -- routing ---------------------------------------------------------------------------------


def quiet_seconds_for(settings: Settings, rule: Rule) -> float:
    return rule.quiet_seconds if rule.quiet_seconds is not None else settings.study_quiet_seconds


def assembler_quiet_seconds(settings: Settings) -> float:
    """The quiet time the assembler should complete studies after: the shortest of
    ``study_quiet_seconds`` and every enabled rule's ``quiet_seconds``. Rules with a longer
    one are held back by ``RouteDecision.not_before``."""
    overrides = [r.quiet_seconds for r in settings.rules if r.enabled and r.quiet_seconds]
    return min([settings.study_quiet_seconds, *overrides])


def route(settings: Settings, session: Session, study_id: int) -> list[RouteDecision]:
    """One decision per (series, rule) of the study, matched or not.

    Ordered by rule priority (higher first), then SeriesNumber, then the rule's place in
    the configuration. Raises ``LookupError`` for an unknown study.
    """
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study with id {study_id}")
    candidates = select_series(study_id, session, load_keys(settings.spool_encryption_key_file))
    destinations = {destination.name: destination for destination in settings.destinations}
    last_received = as_utc(study.last_received_at) if study.last_received_at else None
    keyed: list[tuple[tuple[int, bool, int, str, int], RouteDecision]] = []
    for index, rule in enumerate(settings.rules):
        quiet = quiet_seconds_for(settings, rule)
        not_before = last_received + dt.timedelta(seconds=quiet) if last_received else None
        for candidate in candidates:
            reason = mismatch_reason(rule, candidate, candidate.calling_ae_titles)
            decision = RouteDecision(
                study_id=study_id,
                series_id=candidate.series_id,
                series_instance_uid=candidate.series_instance_uid,
                series_number=candidate.series_number,
                rule=rule,
                matched=reason is None,
                reason=reason,
                destinations=tuple(destinations[name] for name in rule.destinations),
                quiet_seconds=quiet,
                not_before=not_before,
                calling_ae_titles=candidate.calling_ae_titles,
            )
            keyed.append(((-rule.priority, *_series_order(candidate), index), decision))
    keyed.sort(key=lambda item: item[0])
    return [decision for _, decision in keyed]


def matched(decisions: Sequence[RouteDecision]) -> list[RouteDecision]:
    """The decisions that become jobs, in order."""
    return [decision for decision in decisions if decision.matched]
