"""Export: send the node's outputs to destinations, with retries, persisted.

- ``queue``: the ``exports`` rows (enqueue, claim, record outcomes with backoff, retry,
  recover after a crash);
- ``transport``: what a transport is (``send(target, files, on_sent) -> {path: Outcome}``);
  ``cstore`` (DIMSE C-STORE over parallel associations) and ``stowrs`` (DICOMweb STOW-RS)
  are the two there are;
- ``worker``: ``deliver_due`` (claim, send by the destination's kind, record) and the
  ``Exporter`` thread;
- ``target``: a destination as the configuration describes it.

The names other modules use are importable from here.
"""

from dicom_node.export.queue import (
    DeliveryReport,
    ExportError,
    RetryPolicy,
    enqueue,
    recover_interrupted,
    retry,
)
from dicom_node.export.target import ExportTarget, export_target
from dicom_node.export.worker import Exporter, deliver_due

__all__ = [
    "DeliveryReport",
    "ExportError",
    "ExportTarget",
    "Exporter",
    "RetryPolicy",
    "deliver_due",
    "enqueue",
    "export_target",
    "recover_interrupted",
    "retry",
]
