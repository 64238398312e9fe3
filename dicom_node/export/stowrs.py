"""The STOW-RS transport: a DICOMweb destination's files (``dicomweb-client``).

Files go in requests of ``STOW_BATCH`` instances; the server's FailedSOPSequence says
which instances of a request failed, and a request that fails as a whole (HTTP error,
refused connection) fails each of its files with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicom_node.export.target import ExportTarget
from dicom_node.export.transport import OnSent, Outcome
from dicom_node.scu import SendFile
from dicom_node.security.crypto import read_dicom

STOW_BATCH = 32
_FAILED_SOP_SEQUENCE = 0x00081198
_FAILURE_REASON = 0x00081197
_REFERENCED_SOP_INSTANCE_UID = 0x00081155


def failures_of(response: object) -> dict[str, str]:
    """SOP Instance UID -> reason, from a STOW-RS response's FailedSOPSequence."""
    failures: dict[str, str] = {}
    items = getattr(response, "get", lambda _tag: None)(_FAILED_SOP_SEQUENCE)
    for item in getattr(items, "value", None) or []:
        uid = item.get(_REFERENCED_SOP_INSTANCE_UID)
        reason = item.get(_FAILURE_REASON)
        if uid is not None:
            code = f"0x{int(reason.value):04X}" if reason is not None else "unknown"
            failures[str(uid.value)] = f"STOW-RS failure reason {code}"
    return failures


def send(
    target: ExportTarget, files: Sequence[SendFile], on_sent: OnSent | None
) -> dict[Path, Outcome]:
    """STOW-RS ``files`` to ``target.url``; STOW-RS has no per-instance status for ``on_sent``."""
    from dicomweb_client.api import DICOMwebClient

    if target.url is None:
        raise ValueError(f"destination {target.name!r} has no DICOMweb URL")
    client = DICOMwebClient(url=target.url, timeout=target.timeout)
    client.set_http_retry_params(retry=False)  # the export queue does the retrying
    outcomes: dict[Path, Outcome] = {}
    for start in range(0, len(files), STOW_BATCH):
        chunk = files[start : start + STOW_BATCH]
        try:
            datasets = [read_dicom(item.path, item.keys) for item in chunk]
            failures = failures_of(client.store_instances(datasets=datasets))
            errors = {
                item.path: failures.get(str(ds.SOPInstanceUID))
                for item, ds in zip(chunk, datasets, strict=True)
            }
        except Exception as exc:  # HTTP errors, refused connections, unreadable files
            message = f"STOW-RS to {target.url}: {type(exc).__name__}: {exc}"
            errors = {item.path: message for item in chunk}
        outcomes.update((path, Outcome(error is None, error)) for path, error in errors.items())
    return outcomes
