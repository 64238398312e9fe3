"""Which modalities send 2-D images only: what a rule's ``match`` tells of the images it
will route, before any arrives (``docs/images.md``, Routing).

A rule whose ``Modality`` admits only ``PLANAR_MODALITIES`` (and, when it matches on
``SOPClassUID``, only classes outside ``VOLUME_SOP_CLASSES``) routes 2-D images only: a
processor that takes no 2-D images cannot run on any series it matches, so the rule is
refused when it is loaded or saved. Other rules are checked when the job has loaded its
images (``dicom_node.process.check_accepted``).
"""

from __future__ import annotations

from collections.abc import Mapping

#: Modalities whose images are projections, photos, frames of a loop or slides: no slice
#: of a volume. SC is no DICOM modality, but some capture stations write it for OT.
PLANAR_MODALITIES: Mapping[str, str] = {
    "CR": "computed radiography",
    "DX": "digital radiography",
    "IO": "intra-oral radiography",
    "PX": "panoramic X-ray",
    "MG": "mammography",
    "RG": "radiographic imaging (film/screen)",
    "RF": "radiofluoroscopy",
    "XA": "X-ray angiography",
    "US": "ultrasound",
    "ES": "endoscopy",
    "XC": "external-camera photography",
    "GM": "general microscopy",
    "SM": "slide microscopy",
    "OP": "ophthalmic photography",
    "OT": "other (secondary capture)",
    "SC": "secondary capture",
}

#: The SOP classes of those modalities that hold volumes: a rule that names one of them in
#: ``SOPClassUID`` may route volumes, however its ``Modality`` reads.
VOLUME_SOP_CLASSES: Mapping[str, str] = {
    "1.2.840.10008.5.1.4.1.1.13.1.3": "Breast Tomosynthesis Image",
    "1.2.840.10008.5.1.4.1.1.13.1.1": "X-Ray 3D Angiographic Image",
    "1.2.840.10008.5.1.4.1.1.13.1.2": "X-Ray 3D Craniofacial Image",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
}


def _listed_values(condition: object) -> tuple[str, ...] | None:
    """The values a ``match`` condition admits when it lists them (one value or a list of
    strings), None when it admits values it does not list (a regex, a range, a number)."""
    if isinstance(condition, str):
        return (condition.strip(),)
    if isinstance(condition, tuple) and all(isinstance(item, str) for item in condition):
        return tuple(item.strip() for item in condition)
    return None


def planar_only_modalities(match: Mapping[str, object]) -> tuple[str, ...] | None:
    """The modalities a rule's ``match`` admits when they are all 2-D ones and no SOP class
    it admits holds volumes; None when the rule may route a volume (or cannot be told)."""
    modalities = _listed_values(match.get("Modality"))
    if not modalities or not all(m in PLANAR_MODALITIES for m in modalities):
        return None
    if "SOPClassUID" in match:
        classes = _listed_values(match["SOPClassUID"])
        if classes is None or any(uid in VOLUME_SOP_CLASSES for uid in classes):
            return None
    return modalities
