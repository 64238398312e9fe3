"""The DIMSE status table: held against pynetdicom's, and the only place codes are spelled."""

from __future__ import annotations

import io
import itertools
import re
import tokenize
from pathlib import Path

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

import dicom_node
from dicom_node.dimse_status import STORED, Category, DimseStatus, describe, lookup

PACKAGE = Path(dicom_node.__file__).parent

SPEAKS_DIMSE = ("handlers", "scu.py", "export")
"""The modules that answer or read DIMSE statuses: they name them from the table."""

FOUR_HEX_DIGITS = re.compile(r"0[xX][0-9a-fA-F]{4}")
"""How statuses are spelled; tags (``0x00081198``) have eight digits, A-ASSOCIATE-RJ
reasons (``0x01``) two."""


def codes(status: DimseStatus) -> range:
    return range(status.value, status.last + 1)


def test_every_storage_and_general_status_of_pynetdicom_is_in_the_table() -> None:
    for code, (pynetdicom_category, name) in STORAGE_SERVICE_CLASS_STATUS.items():
        status = lookup(code)
        assert status is not None, f"0x{code:04X} is missing"
        assert (status.category.value, status.description) == (pynetdicom_category, name)


def test_the_table_has_nothing_pynetdicom_does_not_know() -> None:
    ours = {code for status in DimseStatus for code in codes(status)}
    assert ours - set(STORAGE_SERVICE_CLASS_STATUS) == {DimseStatus.PENDING}
    assert code_to_category(DimseStatus.PENDING) == Category.PENDING


def test_ranges_do_not_overlap() -> None:
    spans = sorted((status.value, status.last) for status in DimseStatus)
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert last < first


def test_a_code_is_described_by_its_name_when_the_table_has_it() -> None:
    assert describe(0xA702) == "0xA702 (Refused: Out of Resources)"
    assert describe(0x0111) == "0x0111 (Duplication SOP Instance)"
    assert describe(0xA123) == "0xA123"


def test_stored_is_success_and_the_storage_warnings() -> None:
    warnings = {
        code
        for code, (status_category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
        if status_category == "Warning" and code >= 0xB000
    }
    assert {int(status) for status in STORED} == {0x0000, *warnings}


def dimse_modules() -> list[Path]:
    found: list[Path] = []
    for name in SPEAKS_DIMSE:
        path = PACKAGE / name
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found


def status_literals(source: str) -> list[str]:
    """Status codes written as numbers in the code (not in text), as ``line: literal``."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [
        f"{token.start[0]}: {token.string}"
        for token in tokens
        if token.type == tokenize.NUMBER
        and FOUR_HEX_DIGITS.fullmatch(token.string)
        and code_to_category(int(token.string, 16)) != "Unknown"
    ]


@pytest.mark.parametrize("path", dimse_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_status_code_is_spelled_outside_the_table(path: Path) -> None:
    assert status_literals(path.read_text(encoding="utf-8")) == []


def test_the_literal_scan_finds_codes_and_leaves_tags_and_text() -> None:
    source = 'FAILED = 0xA700\nTAG = 0x00081198\ntext = "0xC000"  # 0xB000\nok = 0x0000\n'
    assert status_literals(source + "RJ = (0x01, 0x0002)\n") == ["1: 0xA700", "4: 0x0000"]
    assert {p.name for p in dimse_modules()} >= {"c_store.py", "scu.py", "cstore.py"}
