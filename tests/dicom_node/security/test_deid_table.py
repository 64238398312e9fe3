from __future__ import annotations

import pytest
from pydicom.tag import Tag

from dicom_node.security.deid_options import DeidOption
from dicom_node.security.deid_table import load_table, resolve_action

MODIFIED = DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES
FULL = DeidOption.RETAIN_LONGITUDINAL_FULL_DATES


def test_the_table_names_its_edition_and_source() -> None:
    table = load_table()
    assert table.edition == "2024b"
    assert "innolitics/dicom-standard" in table.source
    assert len(table.rows) > 600


@pytest.mark.parametrize(
    ("keyword", "basic", "options"),
    [
        # Values as PS3.15 2024b Table E.1-1 gives them.
        ("PatientName", "Z", {}),
        ("PatientBirthDate", "Z", {}),
        ("PatientID", "Z/D", {}),
        ("AccessionNumber", "Z", {}),
        ("InstitutionName", "X/Z/D", {"rtnInstIdOpt": "K"}),
        ("StudyInstanceUID", "U", {"rtnUIDsOpt": "K"}),
        ("SOPInstanceUID", "U", {"rtnUIDsOpt": "K"}),
        ("StudyDate", "Z", {"rtnLongFullDatesOpt": "K", "rtnLongModifDatesOpt": "C"}),
        ("PatientSex", "Z", {"rtnPatCharsOpt": "K"}),
        ("DeviceSerialNumber", "X/Z/D", {"rtnDevIdOpt": "K"}),
        ("StudyDescription", "X", {"cleanDescOpt": "C"}),
        ("ReferencedImageSequence", "X/Z/U*", {"rtnUIDsOpt": "K"}),
        ("SourceImageSequence", "X/Z/U*", {"rtnUIDsOpt": "K"}),
    ],
)
def test_rows_match_the_standard(keyword: str, basic: str, options: dict[str, str]) -> None:
    row = load_table().row_for(int(Tag(keyword)))
    assert row is not None
    assert (row.basic, row.options) == (basic, options)


def test_repeating_groups_and_private_attributes_have_rows() -> None:
    table = load_table()
    assert table.private.basic == "X"
    assert table.private.options == {"rtnSafePrivOpt": "C"}
    overlay_data = table.row_for(0x60023000)
    curve = table.row_for(0x50040010)
    assert overlay_data is not None and overlay_data.name == "Overlay Data"
    assert curve is not None and curve.basic == "X"
    assert table.row_for(0x60033000) is None  # odd groups are private, not overlays


def test_options_decide_the_action() -> None:
    table = load_table()

    def action(keyword: str, *options: DeidOption) -> str:
        row = table.row_for(int(Tag(keyword)))
        assert row is not None
        return resolve_action(row, frozenset(options))

    assert action("StudyDate") == "Z"
    assert action("StudyDate", MODIFIED) == "C"
    assert action("StudyDate", FULL) == "K"
    assert action("SeriesDate") == "D"  # X/D: kept valid for IODs that need it
    assert action("InstitutionName") == "D"
    assert action("InstitutionName", DeidOption.RETAIN_INSTITUTION_IDENTITY) == "K"
    assert action("ReferencedImageSequence") == "U*"
    assert action("DeviceSerialNumber", DeidOption.RETAIN_DEVICE_IDENTITY) == "K"
    # The device option "cleans" AE titles; the node cannot, so the Basic Profile's X holds.
    assert action("StationAETitle", DeidOption.RETAIN_DEVICE_IDENTITY) == "X"
    assert action("PatientSex", DeidOption.RETAIN_PATIENT_CHARACTERISTICS) == "K"
