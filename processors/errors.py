"""The errors the node and its processors raise on purpose: one base, two kinds.

Every error raised on purpose derives from ``DicomNodeError`` through one of its two kinds,
so a front end (the command line, a job's record) answers without knowing each class:

- ``BadInputError``: what was asked cannot be done as given: arguments, configuration,
  input files, an unknown or unusable processor or device. Change the input and try again.
  The command line exits with 2.
- ``OperationFailedError``: the request was valid and doing it failed: a peer that does not
  answer, processing that failed. The command line exits with 1.

Messages are for a person: one line, no patient data (names, IDs, birth dates).

The base lives in the processor SDK because the node depends on the SDK and never the
reverse: ``processors`` imports nothing from ``dicom_node``, and both can import this.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Raised on purpose by the node or a processor; the message says what and why."""


class BadInputError(DicomNodeError):
    """The input (arguments, configuration, files, processor, device) cannot be used."""


class OperationFailedError(DicomNodeError):
    """A valid request failed while it was carried out (a peer, processing)."""
