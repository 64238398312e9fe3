"""Real scanner images with a table, and reference body masks drawn by hand (see
``tests/data/README.md``): shared by the segment and cluster tests (imported as a plain
module, like ``proc_testing``)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from pydicom.data import get_testdata_file
from skimage.draw import polygon2mask

from dicom_node.volume import load_directory, load_series
from processors.base import Volume

DATA = Path(__file__).resolve().parent.parent / "data"

#: Where the hand-drawn outline decides what is body, the skin lies where the CT crosses
#: this level: not the body mask's -500 HU, so that the two do not share a threshold.
REFERENCE_SKIN_HU = -400.0

#: Real CTs with a table, head holder or blankets: a 3-slice abdominal series committed
#: under tests/data, and pydicom-data's single slices (a head in a head holder, an abdomen
#: on a table with a blanket, a head on a head rest).
REAL_CTS = ("ct_table", "693_UNCR.dcm", "explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm")
#: Real MRs with much air around the body: a coronal shoulder and an axial abdomen.
REAL_MRS = ("MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")


@cache
def real_volume(name: str) -> Volume:
    """The named image as the node loads it (HU on CT)."""
    if name == "ct_table":
        return load_directory(DATA / "ct_table", "*.dcm")
    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data has no {name}"
    return load_series([path])


def outlines(name: str) -> list[list[list[list[int]]]]:
    """Per slice, the hand-drawn polygons ((row, column) vertices) around the body."""
    with (DATA / "body_outlines.json").open() as file:
        drawn: dict[str, list[list[list[list[int]]]]] = json.load(file)
    return drawn[name]


def inside_outlines(name: str) -> np.ndarray:
    """(slices, rows, columns): inside a drawn outline."""
    volume = real_volume(name)
    plane = volume.shape[1:]
    inside = np.zeros(volume.shape, dtype=bool)
    for z, polygons in enumerate(outlines(name)):
        for polygon in polygons:
            inside[z] |= polygon2mask(plane, np.asarray(polygon, dtype=float))
    return inside


def reference_body(name: str) -> np.ndarray:
    """The reference body mask: on CT, inside the outline and above ``REFERENCE_SKIN_HU``
    with each slice's holes (lungs, bowel gas, sinuses) filled; on MR, the outline."""
    inside = inside_outlines(name)
    volume = real_volume(name)
    if volume.modality != "CT":
        return inside
    above = inside & (np.asarray(volume.array) > REFERENCE_SKIN_HU)
    return np.stack([ndi.binary_fill_holes(plane) for plane in above])
