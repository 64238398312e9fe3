"""Export targets: checked when made, from the configuration, and their transport's kind."""

from __future__ import annotations

import pytest

from dicom_node.config import Destination
from dicom_node.export.target import ExportTarget, export_target


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "needs a name"),
        ({"port": 0}, "port 0 out of range"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"timeout": 0.0}, "timeout must be positive"),
        ({"associations": 0}, "associations"),
    ],
)
def test_a_bad_target_is_refused_with_the_reason(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"name": "pacs", "host": "127.0.0.1", "port": 104}
    with pytest.raises(ValueError, match=message):
        ExportTarget(**{**fields, "ae_title": "PACS", **changes})  # type: ignore[arg-type]


def test_a_destination_with_a_url_is_sent_by_stow_rs() -> None:
    dimse = export_target(Destination(name="pacs", host="pacs.local", port=104), "NODE")
    assert dimse.kind == "c-store" and dimse.calling_ae_title == "NODE"
    web = export_target(Destination(name="web", url="http://pacs.local/dicom-web"), "NODE")
    assert web.kind == "stow-rs" and web.url == "http://pacs.local/dicom-web"
