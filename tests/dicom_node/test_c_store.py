"""The hand-written header scan gives what pydicom gives, on real files, or steps aside."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from dicom_node.handlers.c_store import _INDEXED_TAGS, _HeaderReader, scan_index_fields
from dicom_node.storage import header_text
from tests.dicom_node.test_handlers import ACCEPTED_REAL_FILES


def transfer_syntax(name: str) -> UID:
    dataset = dcmread(Path(get_testdata_file(name)), force=True, stop_before_pixels=True)  # type: ignore[arg-type]
    return UID(getattr(dataset.get("file_meta"), "TransferSyntaxUID", ""))


# The scan reads little endian, not deflated; pydicom reads the rest.
SCANNED_REAL_FILES = [
    name
    for name in ACCEPTED_REAL_FILES
    if (syntax := transfer_syntax(name)) and syntax.is_little_endian and not syntax.is_deflated
]


def encoded_dataset(name: str) -> tuple[bytes, UID]:
    dataset = dcmread(Path(get_testdata_file(name)), force=True)  # type: ignore[arg-type]
    syntax = transfer_syntax(name)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, syntax.is_implicit_VR
    write_dataset(buffer, dataset)
    return buffer.getvalue(), syntax


def pydicom_fields(encoded: bytes, syntax: UID) -> dict[str, str | None]:
    header = _HeaderReader(syntax).read(BytesIO(encoded))
    return {keyword: header_text(header, keyword) for keyword in _INDEXED_TAGS.values()}


@pytest.mark.parametrize("name", SCANNED_REAL_FILES)
def test_scan_agrees_with_pydicom_on_real_files(name: str) -> None:
    encoded, syntax = encoded_dataset(name)
    scanned = scan_index_fields(encoded[:65536], syntax.is_implicit_VR, len(encoded) <= 65536)
    if scanned is not None:  # None: a sequence of undefined length first, pydicom's turn
        assert scanned == pydicom_fields(encoded, syntax)
    else:
        assert b"\xff\xff\xff\xff" in encoded[:65536]


def test_scan_steps_aside_when_the_head_ends_before_the_last_indexed_tag() -> None:
    encoded, syntax = encoded_dataset("CT_small.dcm")
    assert scan_index_fields(encoded[:200], syntax.is_implicit_VR, complete=False) is None
    cut = scan_index_fields(encoded[:200], syntax.is_implicit_VR, complete=True)
    assert cut is None  # 200 bytes end inside an element: not a dataset


def test_scan_steps_aside_for_sequences_of_undefined_length() -> None:
    sequence = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert scan_index_fields(sequence, implicit_vr=False, complete=True) is None
