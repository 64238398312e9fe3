"""The C-STORE transport: a destination's files over DIMSE associations (``dicom_node.scu``).

A success, a storage warning or a *duplicate* answer (by status, or a failure comment
that says so) is delivered: output UIDs are deterministic, so a PACS that says "already
have it" has it. A destination that cannot be reached fails every file of the part that
went over that association.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dicom_node.config import ConfigError
from dicom_node.dimse_status import STORED, DimseStatus, describe
from dicom_node.export.target import ExportTarget
from dicom_node.export.transport import OnSent, Outcome
from dicom_node.scu import AssociationFailedError, SendFile
from dicom_node.scu import send as store

MIN_FILES_PER_ASSOCIATION = 8
"""A batch is split over parallel associations only in parts of at least this many."""


def stored(status: int | None) -> bool:
    """The peer has the instance: success, a warning, or the duplicate status."""
    return status is not None and (status in STORED or status == DimseStatus.DUPLICATE_SOP_INSTANCE)


def outcome(status: int | None, failure: str | None, sent: bool, error: str) -> Outcome:
    """Delivered on success, a warning, or a duplicate answer (by status or comment)."""
    if stored(status):
        return Outcome(True)
    if failure is not None:
        return Outcome("duplicate" in failure.lower(), failure)
    if status is not None:
        return Outcome(False, f"status {describe(status)}")
    # Never answered: the association failed before this instance (or could not be made).
    return Outcome(False, error if not sent else "no response")


def send(
    target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
) -> dict[Path, Outcome]:
    """C-STORE ``files``, over several associations at once when there are many."""
    try:
        tls = target.tls.context() if target.tls is not None else None
    except ConfigError as exc:  # a certificate file changed since the node started
        return {item.path: Outcome(False, str(exc)) for item in files}
    statuses: dict[Path, int | None] = {}

    def progress(item: SendFile, status: int | None) -> None:
        statuses[item.path] = status
        if on_sent is not None:
            on_sent(item, status)

    def send_part(part: list[SendFile]) -> tuple[dict[Path, str], str | None]:
        try:
            report = store(
                part,
                target.host,
                target.port,
                calling_ae=target.calling_ae_title,
                called_ae=target.ae_title,
                timeout=target.timeout,
                on_progress=progress,
                tls=tls,
            )
        except AssociationFailedError as exc:
            return {}, str(exc)
        except Exception as exc:  # a broken peer must not kill the exporter
            return {}, f"{type(exc).__name__}: {exc}"
        return dict(report.failed), None

    # Several associations at once: a PACS that fsyncs each instance (Orthanc) stores
    # several times faster over parallel associations (docs/benchmarks.md).
    count = max(1, min(target.associations, len(files) // MIN_FILES_PER_ASSOCIATION))
    parts = [list(files[start::count]) for start in range(count)]
    failures: dict[Path, str] = {}
    errors: dict[Path, str] = {}
    with ThreadPoolExecutor(count, thread_name_prefix="export") as pool:
        for part, (failed, error) in zip(parts, pool.map(send_part, parts), strict=True):
            failures.update(failed)
            errors.update((item.path, error or "not sent") for item in part)
    return {
        item.path: outcome(
            statuses.get(item.path),
            failures.get(item.path),
            item.path in statuses,
            errors[item.path],
        )
        for item in files
    }
