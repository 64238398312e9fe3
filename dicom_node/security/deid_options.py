"""The options of the Basic Application Level Confidentiality Profile that the node supports.

Kept apart from ``deid`` (which reads the table and imports pydicom) so that the
configuration can name them without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class DeidOption(StrEnum):
    """An option of PS3.15 Table E.1-1, by the name the CLI and configuration use."""

    RETAIN_LONGITUDINAL_FULL_DATES = "retain-longitudinal-full-dates"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain-longitudinal-dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain-patient-characteristics"
    RETAIN_DEVICE_IDENTITY = "retain-device-identity"
    RETAIN_INSTITUTION_IDENTITY = "retain-institution-identity"
    RETAIN_UIDS = "retain-uids"
    RETAIN_SAFE_PRIVATE = "retain-safe-private"


@dataclass(frozen=True)
class OptionColumn:
    """Where an option is in Table E.1-1 and how PS3.16 CID 7050 codes it."""

    column: str
    code_value: str
    code_meaning: str


OPTION_COLUMNS: dict[DeidOption, OptionColumn] = {
    DeidOption.RETAIN_LONGITUDINAL_FULL_DATES: OptionColumn(
        "rtnLongFullDatesOpt",
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: OptionColumn(
        "rtnLongModifDatesOpt",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: OptionColumn(
        "rtnPatCharsOpt", "113108", "Retain Patient Characteristics Option"
    ),
    DeidOption.RETAIN_DEVICE_IDENTITY: OptionColumn(
        "rtnDevIdOpt", "113109", "Retain Device Identity Option"
    ),
    DeidOption.RETAIN_UIDS: OptionColumn("rtnUIDsOpt", "113110", "Retain UIDs Option"),
    DeidOption.RETAIN_SAFE_PRIVATE: OptionColumn(
        "rtnSafePrivOpt", "113111", "Retain Safe Private Option"
    ),
    DeidOption.RETAIN_INSTITUTION_IDENTITY: OptionColumn(
        "rtnInstIdOpt", "113112", "Retain Institution Identity Option"
    ),
}

BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")


def check_options(options: tuple[DeidOption, ...] | frozenset[DeidOption]) -> str | None:
    """Why these options cannot go together, or None when they can."""
    dates = {
        DeidOption.RETAIN_LONGITUDINAL_FULL_DATES,
        DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
    }
    if dates <= set(options):
        return f"{' and '.join(sorted(dates))} exclude each other: keep dates, or shift them"
    return None
