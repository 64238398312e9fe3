"""DIMSE status codes, each with its category and name: the one table the node uses.

The statuses of every DIMSE service (PS3.7 Annex C) and those of the Storage Service
Class (PS3.4 B.2.3), which is what the node speaks (C-ECHO, C-STORE as SCP and SCU).
Modelled on pynetdicom's ``pynetdicom/status.py`` (same names, same categories; a test
holds the two together). A ranged status (``0xA7xx`` out of resources) is one member, its
first code, with ``last`` the end of its range; ``lookup`` finds it for any code inside.
Members are ``int``, so a handler returns one as it is.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Self


class Category(StrEnum):
    """The status classes of PS3.7 Annex C."""

    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"
    CANCEL = "Cancel"
    PENDING = "Pending"


class DimseStatus(IntEnum):
    """A DIMSE status: its code, category, name and (for a range) last code."""

    category: Category
    description: str
    last: int

    def __new__(
        cls, code: int, category: Category, description: str, last: int | None = None
    ) -> Self:
        member = int.__new__(cls, code)
        member._value_ = code
        member.category = category
        member.description = description
        member.last = code if last is None else last
        return member

    def covers(self, code: int) -> bool:
        return self.value <= code <= self.last

    # Every DIMSE service (PS3.7 Annex C)
    SUCCESS = 0x0000, Category.SUCCESS, ""
    NO_SUCH_ATTRIBUTE = 0x0105, Category.FAILURE, "No Such Attribute"
    INVALID_ATTRIBUTE_VALUE = 0x0106, Category.FAILURE, "Invalid Attribute Value"
    ATTRIBUTE_LIST_ERROR = 0x0107, Category.WARNING, "Attribute List Error"
    PROCESSING_FAILURE = 0x0110, Category.FAILURE, "Processing Failure"
    DUPLICATE_SOP_INSTANCE = 0x0111, Category.FAILURE, "Duplication SOP Instance"
    NO_SUCH_SOP_INSTANCE = 0x0112, Category.FAILURE, "No Such SOP Instance"
    NO_SUCH_EVENT_TYPE = 0x0113, Category.FAILURE, "No Such Event Type"
    NO_SUCH_ARGUMENT = 0x0114, Category.FAILURE, "No Such Argument"
    INVALID_ARGUMENT_VALUE = 0x0115, Category.FAILURE, "Invalid Argument Value"
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116, Category.WARNING, "Attribute Value Out of Range"
    INVALID_OBJECT_INSTANCE = 0x0117, Category.FAILURE, "Invalid Object Instance"
    NO_SUCH_SOP_CLASS = 0x0118, Category.FAILURE, "No Such SOP Class"
    CLASS_INSTANCE_CONFLICT = 0x0119, Category.FAILURE, "Class-Instance Conflict"
    MISSING_ATTRIBUTE = 0x0120, Category.FAILURE, "Missing Attribute"
    MISSING_ATTRIBUTE_VALUE = 0x0121, Category.FAILURE, "Missing Attribute Value"
    SOP_CLASS_NOT_SUPPORTED = 0x0122, Category.FAILURE, "Refused: SOP Class Not Supported"
    NO_SUCH_ACTION = 0x0123, Category.FAILURE, "No Such Action"
    NOT_AUTHORISED = 0x0124, Category.FAILURE, "Refused: Not Authorised"
    DUPLICATE_INVOCATION = 0x0210, Category.FAILURE, "Duplicate Invocation"
    UNRECOGNISED_OPERATION = 0x0211, Category.FAILURE, "Unrecognised Operation"
    MISTYPED_ARGUMENT = 0x0212, Category.FAILURE, "Mistyped Argument"
    RESOURCE_LIMITATION = 0x0213, Category.FAILURE, "Resource Limitation"
    CANCEL = 0xFE00, Category.CANCEL, ""
    PENDING = 0xFF00, Category.PENDING, "Pending"

    # Storage Service Class (PS3.4 B.2.3)
    OUT_OF_RESOURCES = 0xA700, Category.FAILURE, "Refused: Out of Resources", 0xA7FF
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = (
        0xA900,
        Category.FAILURE,
        "Data Set Does Not Match SOP Class",
        0xA9FF,
    )
    CANNOT_UNDERSTAND = 0xC000, Category.FAILURE, "Cannot Understand", 0xCFFF
    COERCION_OF_DATA_ELEMENTS = 0xB000, Category.WARNING, "Coercion of Data Elements"
    ELEMENTS_DISCARDED = 0xB006, Category.WARNING, "Element Discarded"
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = (
        0xB007,
        Category.WARNING,
        "Data Set Does Not Match SOP Class",
    )


STORED = frozenset(
    {
        DimseStatus.SUCCESS,
        DimseStatus.COERCION_OF_DATA_ELEMENTS,
        DimseStatus.ELEMENTS_DISCARDED,
        DimseStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)
"""C-STORE answers that mean the peer stored the instance: success and the storage warnings."""


def lookup(code: int) -> DimseStatus | None:
    """The status ``code`` is, or falls in the range of; ``None`` if the table lacks it."""
    for status in DimseStatus:
        if status.covers(code):
            return status
    return None


def describe(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)``: the code and, when the table has it, its
    name (for messages about a peer's answer)."""
    status = lookup(code)
    name = status.description if status is not None else ""
    return f"0x{code:04X} ({name})" if name else f"0x{code:04X}"
