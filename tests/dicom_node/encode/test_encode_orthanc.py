"""Orthanc (Debian package) stores every output kind and files it under the source study."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np

from dicom_node.encode.planar_derived import (
    DX_FOR_PRESENTATION,
    MG_FOR_PRESENTATION,
    US_MULTI_FRAME,
)
from dicom_node.process import build_steps, process_directory
from dicom_node.scu import scan_files, send
from dicom_node.synthetic import generate_series
from dicom_node.testing import running_orthanc
from tests.dicom_node.planar_files import DX, disc, mammogram
from tests.dicom_node.test_image import data


def test_orthanc_accepts_seg_sr_and_derived(tmp_path: Path) -> None:
    series = generate_series(num_slices=4, rows=64, columns=64, uid_seed="orthanc")
    series.write(tmp_path / "in")
    report = process_directory(
        tmp_path / "in", tmp_path / "out", build_steps(["gaussian", "threshold_segment", "predict"])
    )
    assert {r.kind for r in report.outputs} == {"seg", "sr", "derived"}
    files, skipped = scan_files([tmp_path / "in", tmp_path / "out"])
    assert skipped == [] and len(files) == 4 + len(report.outputs)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        sent = send(
            files, "127.0.0.1", orthanc.dicom_port, calling_ae="DICOMNODE", called_ae="ORTHANC"
        )
        assert sent.failed == [] and sent.sent == len(files)
        studies = cast(list[str], orthanc.get_json("/studies"))
        assert len(studies) == 1  # the outputs joined the source study
        study = cast(dict[str, Any], orthanc.get_json(f"/studies/{studies[0]}"))
        assert study["MainDicomTags"]["StudyInstanceUID"] == series.study_instance_uid
        modalities = sorted(
            cast(dict[str, Any], orthanc.get_json(f"/series/{s}"))["MainDicomTags"]["Modality"]
            for s in study["Series"]
        )
        # source CT, derived CT, SEG, and one SR per measurement result (statistics, prediction)
        assert modalities == ["CT", "CT", "SEG", "SR", "SR"]
        stats = cast(dict[str, Any], orthanc.get_json("/statistics"))
        assert stats["CountInstances"] == len(files)


def test_orthanc_accepts_the_outputs_of_2d_sources(tmp_path: Path) -> None:
    """A DX, a (generated) MG and a US cine loop: derived images in their own SOP class,
    the cine loop's SEG of every frame, and the SRs."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DX, folder / "dx.dcm")
    shutil.copy(data("OBXXXX1A_rle_2frame.dcm"), folder / "us.dcm")
    pixels = np.tile(np.arange(300, 780, 10, dtype=np.uint16), (64, 1))  # a ramp, and a disc
    pixels[disc((64, 48), (32, 24), 12)] = 3000
    mammogram(folder / "mg.dcm", pixels)
    report = process_directory(
        folder,
        tmp_path / "out",
        build_steps(["median", "kmeans"], params={"kmeans": {"inside_body": False}}),
    )
    assert len(report.processed) == 3, report.skipped
    classes = {r.sop_class_uid for r in report.outputs if r.kind == "derived"}
    assert classes == {DX_FOR_PRESENTATION, MG_FOR_PRESENTATION, US_MULTI_FRAME}
    # The outputs only: the DX source's Pixel Data has an odd length (tests/data/README.md),
    # which Orthanc's DCMTK refuses; every output is written with an even one.
    files, skipped = scan_files([tmp_path / "out"])
    assert skipped == [] and len(files) == len(report.outputs)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        sent = send(
            files, "127.0.0.1", orthanc.dicom_port, calling_ae="DICOMNODE", called_ae="ORTHANC"
        )
        assert sent.failed == [] and sent.sent == len(files)
        stats = cast(dict[str, Any], orthanc.get_json("/statistics"))
        assert stats["CountInstances"] == len(files)


def test_orthanc_accepts_a_slides_derived_slide_tiled_seg_and_sr(tmp_path: Path) -> None:
    from dicom_node.testing_slide import Disc, write_disc_slide

    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "slide.dcm"
    write_disc_slide(source, rows=300, columns=400, discs=[Disc(150, 200, 80)], tile=128)
    steps = build_steps(
        ["gaussian", "threshold_segment", "features"],
        params={"gaussian": {"sigma_mm": 0.001}, "features": {"region_threshold": None}},
    )
    report = process_directory(tmp_path / "in", tmp_path / "out", steps)
    assert sorted(r.kind for r in report.outputs) == ["derived", "seg", "sr", "sr"]
    files, skipped = scan_files([tmp_path / "in", tmp_path / "out"])
    assert skipped == [] and len(files) == 1 + len(report.outputs)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        sent = send(
            files, "127.0.0.1", orthanc.dicom_port, calling_ae="DICOMNODE", called_ae="ORTHANC"
        )
        assert sent.failed == [] and sent.sent == len(files)
        studies = cast(list[str], orthanc.get_json("/studies"))
        assert len(studies) == 1  # the outputs joined the slide's study
        study = cast(dict[str, Any], orthanc.get_json(f"/studies/{studies[0]}"))
        modalities = sorted(
            cast(dict[str, Any], orthanc.get_json(f"/series/{s}"))["MainDicomTags"]["Modality"]
            for s in study["Series"]
        )
        assert modalities == ["SEG", "SM", "SM", "SR", "SR"]  # the slide and its derived slide
