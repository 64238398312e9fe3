"""Re-identification of what comes back, and the pseudonym map it reads.

The map (``pseudonyms`` table) holds, per de-identified study, a ``PseudonymRecord``
sealed with the node's key (``KeyRing.seal``, bound to the row's pseudonymous study UID):
nothing in it is readable without the key file. ``remember`` adds what one de-identified
instance brought; ``recall`` finds the record of a pseudonymous study UID;
``reidentify`` puts the originals back on a dataset that references the study.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Pseudonym
from dicom_node.security.deid import PseudonymRecord
from dicom_node.security.keys import KeyRing

# What de-identification added, gone again once the originals are back.
DEIDENTIFICATION_MARKS = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def _associated_data(pseudonymous_study_uid: str) -> bytes:
    return f"dicom-node pseudonym map:{pseudonymous_study_uid}".encode()


def remember(
    session: Session, keys: KeyRing, destination: str, record: PseudonymRecord
) -> Pseudonym:
    """Add ``record`` to the study's sealed row (made if new), in the caller's transaction."""
    uid = record.pseudonymous_study_uid
    row = session.scalars(select(Pseudonym).where(Pseudonym.pseudonymous_study_uid == uid)).first()
    now = dt.datetime.now(dt.UTC)
    if row is None:
        row = Pseudonym(pseudonymous_study_uid=uid, destination=destination, created_at=now)
        session.add(row)
        merged = record
    else:
        merged = PseudonymRecord.from_bytes(keys.open(row.sealed, _associated_data(uid)))
        merged.merge(record)
    row.sealed = keys.seal(merged.to_bytes(), _associated_data(uid))
    row.updated_at = now
    session.flush()
    return row


def recall(
    session: Session, keys: KeyRing, pseudonymous_study_uid: str
) -> tuple[str, PseudonymRecord] | None:
    """The destination a study was de-identified for and its record; None if it never was."""
    row = session.scalars(
        select(Pseudonym).where(Pseudonym.pseudonymous_study_uid == pseudonymous_study_uid)
    ).first()
    if row is None:
        return None
    opened = keys.open(row.sealed, _associated_data(pseudonymous_study_uid))
    return row.destination, PseudonymRecord.from_bytes(opened)


def _datasets(ds: Dataset) -> Iterator[Dataset]:
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _datasets(item)


def reidentify(ds: Dataset, record: PseudonymRecord) -> int:
    """Put the originals back on ``ds`` in place: every UID (at any depth) that the map
    knows, and the patient and study attributes. UIDs the map does not know (the new
    object's own) are left as they are. Returns how many UIDs were restored."""
    restored = 0
    for item in _datasets(ds):
        for element in item:
            if element.VR != "UI" or element.value in (None, ""):
                continue
            values = element.value if isinstance(element.value, MultiValue) else [element.value]
            originals = [record.uids.get(str(value), str(value)) for value in values]
            restored += sum(1 for new, old in zip(originals, values, strict=True) if new != old)
            element.value = originals if len(originals) > 1 else originals[0]
    for element in Dataset.from_json(record.identity):
        ds[element.tag] = element
    for keyword in DEIDENTIFICATION_MARKS:
        if keyword in ds:
            del ds[keyword]
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return restored
