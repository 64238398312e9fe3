"""De-identification: PS3.15 Annex E, the Basic Application Level Confidentiality Profile.

``Deidentifier(secret, profile).deidentify(ds)`` changes a dataset in place by the actions
of Table E.1-1 (``deid_table``) under the options in ``profile``, recursing into sequences,
and returns the ``PseudonymRecord`` that re-identification needs (``reid``). It is keyed by
``secret``: the same secret gives the same pseudonymous UIDs, patient pseudonym and date
shift, so a study sent in several parts stays one study, and a repeat is harmless.

Pixel data is not touched. An image that may show text burned into its pixels
(``BurnedInAnnotation`` YES, or a kind that usually does without saying NO) is refused with
``BurnedInAnnotationError`` unless the profile allows it.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from dicom_node import __version__
from dicom_node.security.deid_options import (
    BASIC_PROFILE_CODE,
    OPTION_COLUMNS,
    DeidOption,
    check_options,
)
from dicom_node.security.deid_table import ConfidentialityTable, load_table, resolve_action
from dicom_node.security.keys import KeyRing
from processors.errors import BadInputError

UID_ROOT = "2.25."
PATIENT_PSEUDONYM_PREFIX = "ANON"
MAX_DATE_SHIFT_DAYS = 3650
# Kinds of image that usually carry text in their pixels: ultrasound (the scanner's
# annotations), secondary captures and other (screenshots, scanned documents), and
# visible-light photographs and endoscopy video (labels, overlays burned in by the device).
BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "OT", "SC", "XC", "ES", "GM", "SM", "DOC"})
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
# The patient and study attributes re-identification puts back on what comes back.
IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "PatientComments",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)
DUMMY_VALUES: dict[str, Any] = {
    "AE": "ANONYMOUS",
    "AS": "000D",
    "CS": "ANONYMOUS",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMOUS",
    "LT": "ANONYMOUS",
    "PN": "ANONYMOUS",
    "SH": "ANONYMOUS",
    "ST": "ANONYMOUS",
    "TM": "000000",
    "UC": "ANONYMOUS",
    "UR": "http://anonymous.invalid",
    "UT": "ANONYMOUS",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "UL": 0,
    "US": 0,
    "SV": 0,
    "UV": 0,
    "OB": b"\x00\x00",
    "OW": b"\x00\x00",
    "UN": b"\x00\x00",
}


class DeidentificationError(BadInputError):
    """A dataset cannot be de-identified as asked; the message says why (never a value)."""


class BurnedInAnnotationError(DeidentificationError):
    """The image may show identifying text in its pixels, which the node does not clean."""


@dataclass(frozen=True)
class DeidProfile:
    """The Basic Profile with these options. ``safe_private`` lists the private elements
    the Retain Safe Private option keeps, as (private creator, element byte) pairs: none
    are listed by default, so that option keeps nothing unless a site names them."""

    options: frozenset[DeidOption] = frozenset()
    allow_burned_in: bool = False
    safe_private: frozenset[tuple[str, int]] = frozenset()

    def __post_init__(self) -> None:
        problem = check_options(self.options)
        if problem:
            raise DeidentificationError(problem)

    @property
    def shifts_dates(self) -> bool:
        return DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options


@dataclass
class PseudonymRecord:
    """What re-identifying a study needs: its UIDs (pseudonymous -> original), the original
    patient and study attributes (DICOM JSON) and the date shift. One per study."""

    pseudonymous_study_uid: str
    original_study_uid: str
    uids: dict[str, str] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    date_shift_days: int = 0

    def merge(self, other: PseudonymRecord) -> None:
        """Add what a later part of the same study brought (more series, more UIDs)."""
        if other.pseudonymous_study_uid != self.pseudonymous_study_uid:
            raise ValueError("pseudonym records of two studies cannot be merged")
        self.uids.update(other.uids)
        for keyword, value in other.identity.items():
            self.identity.setdefault(keyword, value)

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> PseudonymRecord:
        return cls(**json.loads(data.decode("utf-8")))


def secret_from(keys: KeyRing) -> bytes:
    """The de-identification secret, derived from the node's current key (so a rotated key
    gives new pseudonyms; the map in the database still re-identifies the old ones)."""
    return hmac.digest(keys.keys[0], b"dicom-node de-identification v1", "sha256")


def may_show_burned_in_text(ds: Dataset) -> bool:
    """Whether the instance may carry identifying text in its pixels or document."""
    if "EncapsulatedDocument" in ds:
        return True
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return False
    burned_in = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned_in == "YES":
        return True
    if burned_in == "NO":
        return False
    modality = str(ds.get("Modality", "")).strip().upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    return modality in BURNED_IN_MODALITIES or sop_class.startswith(SECONDARY_CAPTURE_PREFIX)


class Deidentifier:
    """De-identifies datasets with one secret and one profile; see the module docstring."""

    def __init__(
        self, secret: bytes, profile: DeidProfile, table: ConfidentialityTable | None = None
    ) -> None:
        if len(secret) < 16:
            raise DeidentificationError("a de-identification secret is at least 16 bytes")
        self.secret = secret
        self.profile = profile
        self.table = table or load_table()

    # -- keyed pseudonyms -----------------------------------------------------------------

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.digest(self.secret, f"{purpose}:{value}".encode(), "sha256")

    def pseudonymous_uid(self, uid: str) -> str:
        """A UID under 2.25 from the first 128 bits of HMAC-SHA256(secret, uid)."""
        return UID_ROOT + str(int.from_bytes(self._digest("uid", uid.strip())[:16], "big"))

    def patient_pseudonym(self, patient_id: str, separator: str = "-") -> str:
        """``ANON-`` and 12 hex digits, the same for one patient; ``separator="^"`` gives
        it as a person name of two components (family ``ANON``)."""
        digits = self._digest("patient", patient_id).hex()[:12].upper()
        return f"{PATIENT_PSEUDONYM_PREFIX}{separator}{digits}"

    def date_shift_days(self, patient_id: str) -> int:
        """Days every date of this patient moves back: 1 to ``MAX_DATE_SHIFT_DAYS``."""
        digest = self._digest("date-shift", patient_id)
        return 1 + int.from_bytes(digest[:8], "big") % MAX_DATE_SHIFT_DAYS

    # -- the profile ----------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> PseudonymRecord:
        """De-identify ``ds`` in place; the record re-identification needs.

        Raises ``BurnedInAnnotationError`` (before changing anything) for an image that may
        show text in its pixels, unless the profile allows it.
        """
        if not self.profile.allow_burned_in and may_show_burned_in_text(ds):
            raise BurnedInAnnotationError(
                "the image may show identifying text burned into its pixels"
                " (BurnedInAnnotation YES, or a US/SC/photo image without BurnedInAnnotation NO);"
                " the node does not clean pixels: allow it explicitly if you have checked"
            )
        original_study = str(ds.get("StudyInstanceUID", ""))
        patient_id = str(ds.get("PatientID", ""))
        record = PseudonymRecord(
            pseudonymous_study_uid=self._new_uid(original_study, {}) if original_study else "",
            original_study_uid=original_study,
            identity=_identity_of(ds),
            date_shift_days=self.date_shift_days(patient_id) if self.profile.shifts_dates else 0,
        )
        self._clean(ds, record, patient_id)
        self._mark(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
                if keyword in meta:
                    del meta[keyword]
            meta.pop(Tag(0x0002, 0x0018), None)  # Receiving Application Entity Title
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return record

    def _new_uid(self, uid: str, uids: dict[str, str]) -> str:
        pseudonym = self.pseudonymous_uid(uid)
        uids[pseudonym] = uid
        return pseudonym

    def _clean(self, ds: Dataset, record: PseudonymRecord, patient_id: str) -> None:
        removed_groups: set[int] = set()
        kept_private_blocks: set[tuple[int, int]] = set()
        for tag in list(ds.keys()):
            element = ds[tag]
            if tag.is_private:
                if not tag.is_private_creator and self._safe_private(ds, tag):
                    kept_private_blocks.add((tag.group, tag.element >> 8))
                elif not tag.is_private_creator:
                    del ds[tag]
                continue
            row = self.table.row_for(int(tag))
            if row is None:
                if element.VR == "SQ":
                    self._clean_items(element, record, patient_id)
                continue
            action = resolve_action(row, self.profile.options)
            if action == "X":
                del ds[tag]
                if tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000:
                    removed_groups.add(tag.group)  # an overlay without its data is no overlay
            elif tag in (Tag("PatientID"), Tag("PatientName")) and action in ("Z", "D"):
                separator = "^" if element.VR == "PN" else "-"
                element.value = self.patient_pseudonym(patient_id, separator)
            elif action == "Z":
                element.value = Sequence() if element.VR == "SQ" else None
            elif action in ("D", "K", "C", "U*") and element.VR == "SQ":
                self._clean_items(element, record, patient_id)
            elif action == "D":
                element.value = DUMMY_VALUES.get(element.VR)
            elif action in ("U", "U*"):
                element.value = self._replaced_uids(element, record)
            elif action == "C":
                self._clean_element(element, record)
        for tag in list(ds.keys()):
            unused = tag.is_private_creator and (tag.group, tag.element) not in kept_private_blocks
            if unused or tag.group in removed_groups:
                del ds[tag]

    def _clean_items(self, element: DataElement, record: PseudonymRecord, patient_id: str) -> None:
        for item in element.value or ():
            self._clean(item, record, patient_id)

    def _clean_element(self, element: DataElement, record: PseudonymRecord) -> None:
        if element.VR in ("DA", "DT"):
            element.value = _shifted(element.value, element.VR, record.date_shift_days)
        # TM under the modified dates option: kept (the shift is whole days)

    def _replaced_uids(self, element: DataElement, record: PseudonymRecord) -> Any:
        if element.value is None or element.value == "":
            return element.value
        if isinstance(element.value, MultiValue | list):
            return [self._new_uid(str(uid), record.uids) for uid in element.value]
        return self._new_uid(str(element.value), record.uids)

    def _safe_private(self, ds: Dataset, tag: BaseTag) -> bool:
        if DeidOption.RETAIN_SAFE_PRIVATE not in self.profile.options:
            return False
        creator = ds.get(Tag(tag.group, tag.element >> 8))
        if creator is None:
            return False
        return (str(creator.value), tag.element & 0xFF) in self.profile.safe_private

    def _mark(self, ds: Dataset) -> None:
        """PatientIdentityRemoved, DeidentificationMethod and its code sequence (CID 7050)."""
        ds.PatientIdentityRemoved = "YES"
        options = sorted(self.profile.options)
        edition = self.table.edition
        ds.DeidentificationMethod = [
            f"PS3.15 {edition} E.1-1 Basic Profile; dicom-node {__version__}"[:64],
            *(OPTION_COLUMNS[option].code_meaning[:64] for option in options),
        ]
        codes = [BASIC_PROFILE_CODE] + [
            (OPTION_COLUMNS[option].code_value, OPTION_COLUMNS[option].code_meaning)
            for option in options
        ]
        ds.DeidentificationMethodCodeSequence = Sequence(
            [_code_item(value, meaning) for value, meaning in codes]
        )
        if DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in self.profile.options:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self.profile.shifts_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _identity_of(ds: Dataset) -> dict[str, Any]:
    subset = Dataset()
    for keyword in IDENTITY_KEYWORDS:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    return subset.to_json_dict()


def _shift_one(value: str, vr: str, days: int) -> str | None:
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None
    shifted = (day - dt.timedelta(days=days)).strftime("%Y%m%d")
    return shifted + text[8:] if vr == "DT" else shifted


def _shifted(value: Any, vr: str, days: int) -> Any:
    """Dates (and the date part of date-times) ``days`` earlier; what cannot be read as a
    date is emptied, never kept."""
    values: Iterable[Any] = value if isinstance(value, MultiValue | list) else [value]
    shifted = []
    for item in values:
        if item is None or str(item) == "":
            continue
        parts = str(item).split("-")  # a range: both ends
        moved = [_shift_one(part, vr, days) if part else "" for part in parts]
        if any(part is None for part in moved):
            return None
        shifted.append("-".join(part or "" for part in moved))
    if not shifted:
        return None
    return shifted if len(shifted) > 1 else shifted[0]
