"""PS3.15 Table E.1-1 as data (``table_e1_1.json``, which names its edition and source) and
the action it gives an element under the options in use.

Actions: ``X`` remove, ``Z`` empty, ``D`` a dummy value, ``K`` keep, ``C`` clean, ``U`` a
pseudonymous UID; ``X/Z``, ``X/D``, ``X/Z/D``, ``Z/D`` and ``X/Z/U*`` say "the first unless
the IOD needs the element". Without the IOD's module tables at hand, the node takes the one
that keeps any IOD valid and still removes the information: ``Z`` for ``X/Z``, ``D`` for
the ones with ``D``, and for ``X/Z/U*`` the sequence kept with every UID in it replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from dicom_node.security.deid_options import OPTION_COLUMNS, DeidOption

Action = Literal["X", "Z", "D", "K", "C", "U", "U*"]

CONSERVATIVE: dict[str, Action] = {
    "X": "X",
    "Z": "Z",
    "D": "D",
    "K": "K",
    "C": "C",
    "U": "U",
    "X/Z": "Z",
    "X/D": "D",
    "X/Z/D": "D",
    "Z/D": "D",
    "X/Z/U*": "U*",
}
_TAG = re.compile(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)")
_REPEATING = re.compile(r"\(([0-9A-F]{2})XX,([0-9A-FX]{4})\)")


@dataclass(frozen=True)
class TableRow:
    tag: str
    name: str
    basic: str
    options: dict[str, str]


@dataclass(frozen=True)
class ConfidentialityTable:
    """The rows by tag; repeating groups (``50xx``, ``60xx``) by their high byte."""

    edition: str
    source: str
    rows: dict[int, TableRow]
    repeating: dict[tuple[int, str], TableRow]
    private: TableRow

    def row_for(self, tag: int) -> TableRow | None:
        if tag in self.rows:
            return self.rows[tag]
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 == 0 and group & 0xFF00 in (0x5000, 0x6000):
            high = group >> 8
            return self.repeating.get((high, f"{element:04X}")) or self.repeating.get(
                (high, "XXXX")
            )
        return None


def _parse(document: dict[str, object]) -> ConfidentialityTable:
    rows: dict[int, TableRow] = {}
    repeating: dict[tuple[int, str], TableRow] = {}
    private: TableRow | None = None
    raw_rows = document["rows"]
    assert isinstance(raw_rows, list)
    for raw in raw_rows:
        options = {k: v for k, v in raw.items() if k.endswith("Opt")}
        row = TableRow(raw["tag"], raw["name"], raw["basic"], options)
        if (plain := _TAG.fullmatch(row.tag)) is not None:
            rows[int(plain.group(1) + plain.group(2), 16)] = row
        elif (group := _REPEATING.fullmatch(row.tag)) is not None:
            repeating[(int(group.group(1), 16), group.group(2))] = row
        elif "GGGG IS ODD" in row.tag:
            private = row
        else:
            raise ValueError(f"Table E.1-1: cannot read the tag {row.tag!r}")
    if private is None:
        raise ValueError("Table E.1-1: no row for private attributes")
    return ConfidentialityTable(
        edition=str(document["edition"]),
        source=str(document["source"]),
        rows=rows,
        repeating=repeating,
        private=private,
    )


@cache
def load_table() -> ConfidentialityTable:
    """The table shipped with the node (``dicom_node/security/table_e1_1.json``)."""
    text = resources.files("dicom_node.security").joinpath("table_e1_1.json").read_text("utf-8")
    return _parse(json.loads(text))


# The only cleaning the node does: dates shifted by the patient's offset. The other options'
# ``C`` (free-text descriptors, AE titles, patient state) fall back to the Basic Profile.
CLEANS = frozenset({DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES})


def resolve_action(row: TableRow, options: frozenset[DeidOption]) -> Action:
    """The action for ``row``: ``K`` if an option in use keeps it, ``C`` if one the node can
    clean with cleans it, else the Basic Profile's (its conservative reading, see above)."""
    said = {option: row.options.get(OPTION_COLUMNS[option].column) for option in options}
    if "K" in said.values():
        return "K"
    if any(said[option] == "C" for option in options & CLEANS):
        return "C"
    return CONSERVATIVE[row.basic]
