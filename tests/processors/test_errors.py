"""One base for every error raised on purpose, in two kinds the command line maps to exit
codes (that the SDK holding it imports nothing from the node: test_sdk_boundary.py)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from processors.errors import BadInputError, DicomNodeError, OperationFailedError

BAD_INPUT = [
    "dicom_node.config.ConfigError",
    "dicom_node.export.queue.ExportError",
    "dicom_node.process.ProcessError",
    "dicom_node.process.NoUsableSeriesError",
    "dicom_node.volume.SeriesError",
    "dicom_node.image.ImageError",
    "dicom_node.slide.SlideError",
    "dicom_node.encode.uids.UIDRootError",
    "dicom_node.storage.InvalidUIDError",
    "dicom_node.jobs.state.InvalidTransitionError",
    "processors.devices.BackendError",
    "processors.registry.UnknownProcessorError",
    "processors.registry.ProcessorUnavailableError",
    "db.upsert.UnsupportedDatabaseError",
    "dicom_node.ae.wire.ProtocolError",
    "dicom_node.ae.wire.PeerGoneError",
    "dicom_node.ae.commitment.MalformedReportError",
    "dicom_node.security.deid.DeidentificationError",
    "dicom_node.security.deid.BurnedInAnnotationError",
    "dicom_node.security.keys.KeyFileError",
    "dicom_node.security.keys.DecryptionError",
    "dicom_node.security.audit_syslog.SyslogAddressError",
    "dicom_node.security.crypto.EncryptedFileError",
    "dicom_node.api.tokens.TokenError",
    "dicom_node.export.queue.ExportStateConflictError",
    "dicom_node.jobs.state.JobStateConflictError",
    "dicom_node.model_evaluation.EvaluationError",
    "dicom_node.model_registry.ModelConflictError",
    "dicom_node.model_registry.ModelRegistryError",
    "dicom_node.model_registry.UnknownModelError",
    "dicom_node.model_registry.UploadTooLargeError",
    "dicom_node.queries.since.BadMomentError",
    "dicom_node.routing_admin.EntryConflictError",
    "dicom_node.routing_admin.InvalidEntryError",
    "dicom_node.routing_admin.UnknownEntryError",
    "processors.model_upload.UploadRefusedError",
]
FAILED = [
    "dicom_node.scu.AssociationFailedError",
    "dicom_node.encode.common.EncodeError",
    "dicom_node.jobs.worker.JobError",
    "dicom_node.jobs.worker.JobRefusedError",
    "dicom_node.process.ImageNotAcceptedError",
    "dicom_node.testing.ToolMissingError",
    "processors.base.ProcessorError",
    "processors.model_manifest.ModelError",
    "db.session.MigrationError",
]
KINDS = (BadInputError, OperationFailedError)
# Builtins that callers catch some of these by (a pydantic validator, dicom_node.process).
BUILTIN_MIXINS = {
    "dicom_node.encode.uids.UIDRootError": ValueError,
}


def error_class(dotted: str) -> type[Exception]:
    module, _, name = dotted.rpartition(".")
    found = getattr(importlib.import_module(module), name)
    assert isinstance(found, type) and issubclass(found, Exception)
    return found


@pytest.mark.parametrize(
    ("dotted", "kind"),
    [(name, BadInputError) for name in BAD_INPUT]
    + [(name, OperationFailedError) for name in FAILED],
)
def test_every_error_raised_on_purpose_is_of_one_kind(dotted: str, kind: type) -> None:
    cls = error_class(dotted)
    assert issubclass(cls, kind) and issubclass(cls, DicomNodeError)
    other = OperationFailedError if kind is BadInputError else BadInputError
    assert not issubclass(cls, other)
    mixin = BUILTIN_MIXINS.get(dotted)
    if mixin is not None:
        assert issubclass(cls, mixin)


def test_no_error_class_is_left_out() -> None:
    """A new ``class SomethingError`` in the node or the SDK gets its kind here too."""
    root = Path(__file__).resolve().parents[2]
    declared = set()
    for package in ("dicom_node", "processors", "db"):
        for path in (root / package).rglob("*.py"):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            for name in re.findall(r"^class (\w+Error)\(", path.read_text(), re.MULTILINE):
                declared.add(f"{module}.{name}")
    bases = {f"processors.errors.{cls.__name__}" for cls in (DicomNodeError, *KINDS)}
    assert declared - bases == set(BAD_INPUT) | set(FAILED)
