"""dicom_node/modalities.py: which rules route 2-D images only, told from their match."""

from __future__ import annotations

from typing import Any

import pytest

from dicom_node.config import RegexMatch, Rule
from dicom_node.modalities import PLANAR_MODALITIES, planar_only_modalities

TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
DIGITAL_MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"


def match_of(match: dict[str, Any]) -> dict[str, Any]:
    """The match as a loaded rule holds it (lists as tuples, regexes compiled)."""
    return dict(Rule.model_validate({"name": "r", "pipeline": ["x"], "match": match}).match)


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"Modality": "MG"}, ("MG",)),
        ({"Modality": ["CR", "DX"], "BodyPartExamined": "CHEST"}, ("CR", "DX")),
        ({"Modality": ["OT", "SC"]}, ("OT", "SC")),
        ({"Modality": "MG", "SOPClassUID": DIGITAL_MAMMOGRAPHY}, ("MG",)),
        # Tomosynthesis is MG too, but a volume: a rule that may take it is not 2-D only.
        ({"Modality": "MG", "SOPClassUID": TOMOSYNTHESIS}, None),
        ({"Modality": "MG", "SOPClassUID": [DIGITAL_MAMMOGRAPHY, TOMOSYNTHESIS]}, None),
        ({"Modality": "MG", "SOPClassUID": {"regex": "^1.2.840"}}, None),
        ({"Modality": ["US", "CT"]}, None),
        ({"Modality": "CT"}, None),
        ({"Modality": {"regex": "^(CR|DX)$"}}, None),  # what a regex admits is not listed
        ({"BodyPartExamined": "CHEST"}, None),
        ({}, None),
    ],
)
def test_planar_only_modalities(match: dict[str, Any], expected: tuple[str, ...] | None) -> None:
    assert planar_only_modalities(match_of(match)) == expected


def test_the_issue_modalities_are_known_2d_ones() -> None:
    assert {"CR", "DX", "MG", "US", "XA", "SM", "OT", "SC"} <= set(PLANAR_MODALITIES)
    assert not {"CT", "MR", "PT", "NM"} & set(PLANAR_MODALITIES)
    assert isinstance(match_of({"Modality": {"regex": "CR"}})["Modality"], RegexMatch)
