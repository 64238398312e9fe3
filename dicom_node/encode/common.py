"""What the encoders share: errors, codes, source ordering, series numbers."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, DT, TM

from processors.base import Code, Volume
from processors.errors import OperationFailedError

if TYPE_CHECKING:
    from dicom_node.encode.uids import Provenance

#: The node's private coding scheme (``processors.base.Codes.local``).
PRIVATE_SCHEME = "99DCMNODE"

#: Series numbers of the outputs: SEG 9100+, derived 9200+, SR 9300+ (index added).
SERIES_NUMBER = {"seg": 9100, "derived": 9200, "sr": 9300}


class EncodeError(OperationFailedError):
    """A result cannot be written as DICOM against these sources; the message says why."""


#: Value representations highdicom parses when it copies a source's attributes into an
#: output; an unparseable one (a date written ``1961-04-09``) makes it refuse the output.
PARSED_VRS: dict[str, type[Any]] = {"DA": DA, "TM": TM, "DT": DT}


def _values(value: object) -> list[str]:
    """An element's values as text: raw bytes as read (backslash-separated), one value, or
    the list of a converted multi-valued element."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00").split("\\")
    if isinstance(value, str | int | float) or value is None:
        return str(value or "").split("\\")
    return [str(item) for item in value]  # type: ignore[attr-defined]


def _parses(vr: str, value: object) -> bool:
    try:
        for part in _values(value):
            if part.strip():
                PARSED_VRS[vr](part.strip())
    except ValueError:
        return False
    return True


#: Type 2 attributes of the Patient and General Study modules that highdicom reads from
#: the source of every SEG and SR it builds (an absent one makes it refuse the output).
COPIED_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def add_absent_type_2(datasets: Sequence[Dataset]) -> list[str]:
    """Give ``datasets`` an empty value for each of ``COPIED_TYPE_2`` they lack, in place
    (the job's copies): a capture without PatientID (pydicom's ``OT-PAL-8-face.dcm``) gets
    its SEG and SR with an empty one, as the IODs allow. Returns the keywords added."""
    added: dict[str, None] = {}
    for dataset in datasets:
        for keyword in COPIED_TYPE_2:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
                added[keyword] = None
    return list(added)


def blank_unparseable_values(datasets: Sequence[Dataset]) -> list[str]:
    """Empty the top-level date and time values of ``datasets`` that do not parse, in place
    (the datasets are the job's copies, not the spool's files), so that the outputs keep
    the source's other attributes. Returns the keywords emptied, never the values."""
    blanked: dict[str, None] = {}
    for dataset in datasets:
        for tag in list(dataset.keys()):
            try:
                vr = dictionary_VR(tag)
            except KeyError:  # private or unknown
                continue
            if vr not in PARSED_VRS:
                continue
            if not _parses(vr, dataset.get_item(tag).value):
                dataset[tag] = DataElement(tag, vr, "")
                blanked[dataset[tag].keyword or str(tag)] = None
    return list(blanked)


def uncompressed_file_meta(dataset: Dataset) -> FileMetaDataset:
    """File Meta for ``dataset`` written Explicit VR Little Endian by this node."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def refused_by_highdicom(what: str, error: Exception) -> EncodeError:
    """The error for an output highdicom refused, with every quoted value in its message
    replaced (it quotes the values it cannot use, a birth date among them). An attribute
    error names a type and an attribute, no value: kept as it is, for whoever debugs it."""
    message = (
        str(error) if isinstance(error, AttributeError) else _QUOTED.sub("'<value>'", str(error))
    )
    return EncodeError(f"highdicom refused {what}: {message}")


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning[:64])


def coding_schemes(codes: Sequence[Code]) -> list[CodingSchemeIdentificationItem]:
    """The identification item for our private scheme when any code uses it."""
    if not any(code.scheme == PRIVATE_SCHEME for code in codes):
        return []
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="dicom-node local concepts",
            responsible_organization="dicom-node",
        )
    ]


def long_string(text: str) -> str:
    """A value that fits LO (64 characters, no backslash)."""
    return text.replace("\\", "/")[:64]


def ordered_sources(geometry: Volume, sources: Sequence[Dataset]) -> list[Dataset]:
    """The source datasets in the volume's slice order (one per slice, or the multi-frame).

    Raises ``EncodeError`` when an instance of the volume is not among ``sources``.
    """
    if not geometry.sop_instance_uids:
        raise EncodeError("the result's volume has no source instance UIDs (not from DICOM)")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [uid for uid in dict.fromkeys(geometry.sop_instance_uids) if uid not in by_uid]
    if missing:
        raise EncodeError(
            f"{len(missing)} source instance(s) of the result are not among the given "
            f"datasets, e.g. {missing[0]}"
        )
    if geometry.source_frame_numbers:
        return [by_uid[uid] for uid in dict.fromkeys(geometry.sop_instance_uids)]
    return [by_uid[uid] for uid in geometry.sop_instance_uids]


def source_series_uid(geometry: Volume | None, sources: Sequence[Dataset]) -> str:
    """The source series' UID, from the volume or else from the datasets."""
    uid = (geometry.series_instance_uid if geometry is not None else None) or (
        str(sources[0].SeriesInstanceUID) if sources else None
    )
    if not uid:
        raise EncodeError("no source Series Instance UID to derive output UIDs from")
    return uid


def input_key(geometry: Volume | None, sources: Sequence[Dataset]) -> str:
    """What output UIDs are derived from: the source series' UID and a digest of the set of
    its instances that went in. A series that grew (a study completed again with more
    slices) gives new UIDs for every output of it: a derived slice's stored values depend
    on the whole volume (its rescale, any 3-D step), so no output is known unchanged, and
    a PACS keeps the first object it got under a UID."""
    if geometry is not None and geometry.sop_instance_uids:
        instances = set(geometry.sop_instance_uids)
    else:
        instances = {str(ds.SOPInstanceUID) for ds in sources}
    listed = json.dumps(sorted(instances), separators=(",", ":"))
    return f"{source_series_uid(geometry, sources)}:{hashlib.sha256(listed.encode()).hexdigest()}"


def output_identity(
    provenance: Provenance, kind: str, series_uid: str, index: int
) -> dict[str, Any]:
    """The highdicom constructor arguments every output shares: its deterministic UIDs,
    series number, and the node and processor as equipment."""
    from dicom_node.encode.uids import MANUFACTURER

    return {
        "series_instance_uid": provenance.series_uid(series_uid, kind, index),
        "series_number": SERIES_NUMBER[kind] + index,
        "sop_instance_uid": provenance.instance_uid(series_uid, kind, index),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": long_string(provenance.processor),
        "software_versions": provenance.software_versions,
        "device_serial_number": provenance.device_version,
    }
