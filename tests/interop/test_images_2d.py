"""2-D images end to end: real CR, DX, MG, ultrasound (single frames and cine loops),
whole slides, and secondary captures in RGB, YBR and palette colour, uncompressed and
JPEG, JPEG-LS, JPEG 2000 and RLE coded, sent with DCMTK storescu to one node that runs
the 2-D rules of config/rules.example.toml as written there; each file's study is routed,
processed, and its SEG, SR and derived images are stored in a real Orthanc. A rule that
names a processor taking no 2-D image without saying which modality it takes is
accepted, and its job fails before any step runs, with the reason, as a dead letter."""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from orchestration_support import cli_json, wait_for_exports, wait_for_jobs, write_config
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicom_node.config import Rule
from dicom_node.modalities import planar_only_modalities
from dicom_node.testing import (
    OrthancProcess,
    dcmtk_env,
    require_tool,
    running_orthanc,
    start_node,
    storescu,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DX_IMAGE = REPO / "tests" / "data" / "highdicom" / "dx_image.dcm"
SLIDES = REPO / "tests" / "data" / "wsi"
CR_SMALL = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/77654033/CR1/6154"
MAMMOGRAPHY_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"

# Matches the DX by its SOP class, not its modality, so it is not known to be 2-D when the
# node starts: its job finds out on load.
REFUSED_RULE = """
[[rules]]
name = "dx-volume-model"
match = { SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" }
pipeline = ["unet"]
destinations = ["pacs"]
"""

# storescu proposes one compressed transfer syntax per run (and the uncompressed ones).
PROPOSE = {
    "1.2.840.10008.1.2": [],
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2.4.50": ["-xy"],  # JPEG baseline
    "1.2.840.10008.1.2.4.70": ["-xs"],  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": ["-xt"],  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ["-xu"],  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ["-xv"],  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ["-xw"],  # JPEG 2000
    "1.2.840.10008.1.2.5": ["-xr"],  # RLE lossless
}


@dataclass(frozen=True)
class Source:
    """One file sent, as a study of its own."""

    label: str
    path: Path
    rule: str

    @property
    def study_uid(self) -> str:
        return str(pydicom.dcmread(self.path, stop_before_pixels=True).StudyInstanceUID)

    @property
    def transfer_syntax(self) -> str:
        return str(pydicom.dcmread(self.path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in the installed pydicom test data"
    return Path(path)


def fresh_copy(source: Path, out: Path, **changes: str) -> Path:
    """``source`` as a new study, series and instance (test files share their UIDs, and
    some have none), with ``changes`` to its header; written with File Meta."""
    dataset = pydicom.dcmread(source, force=True)
    if "TransferSyntaxUID" not in dataset.file_meta:  # read without File Meta
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(out, enforce_file_format=True)
    return out


def jpeg_ls(source: Path, out: Path) -> Path:
    """``source`` JPEG-LS lossless coded by DCMTK."""
    subprocess.run(
        [require_tool("dcmcjpls"), str(source), str(out)],
        env=dcmtk_env(),
        check=True,
        capture_output=True,
        timeout=60,
    )
    return out


def sources(directory: Path) -> list[Source]:
    def copy(name: str | Path, **changes: str) -> Path:
        path = name if isinstance(name, Path) else pydicom_file(name)
        return fresh_copy(path, directory / f"{len(list(directory.glob('*')))}.dcm", **changes)

    mammogram = copy(
        DX_IMAGE,
        SOPClassUID=MAMMOGRAPHY_FOR_PRESENTATION,
        Modality="MG",
        BodyPartExamined="BREAST",
    )
    return [
        Source("CR MONOCHROME1, uncompressed", copy(CR_SMALL), "cr-radiograph"),
        Source("CR 1760x1760, JPEG 2000", copy("RG3_J2KI.dcm"), "cr-radiograph"),
        Source("DX MONOCHROME1, uncompressed", copy(DX_IMAGE), "dx-radiograph"),
        Source("MG, JPEG-LS lossless", jpeg_ls(mammogram, directory / "mg.dcm"), "mg-mammogram"),
        Source("US YBR_RCT, JPEG 2000 lossless", copy("US1_J2KR.dcm"), "us-ultrasound"),
        Source("US grey, JPEG lossless", copy("JPGLosslessP14SV1_1s_1f_8b.dcm"), "us-ultrasound"),
        Source(
            "US cine 2 frames, palette, RLE",
            copy("OBXXXX1A_rle_2frame.dcm"),
            "us-ultrasound",
        ),
        Source(
            "US cine 30 frames, YBR_FULL_422, JPEG",
            copy("examples_ybr_color.dcm"),
            "us-ultrasound",
        ),
        Source("SC RGB, RLE", copy("SC_rgb_rle.dcm"), "ot-secondary-capture"),
        Source(
            "SC YBR_FULL_422, JPEG baseline",
            copy("SC_rgb_dcmtk_+eb+cy+np.dcm"),
            "ot-secondary-capture",
        ),
        Source(
            "SC YBR_FULL, uncompressed",
            copy("SC_ybr_full_uncompressed.dcm"),
            "ot-secondary-capture",
        ),
        # A capture station that wrote no modality: given OT, as the node cannot route it
        # otherwise.
        Source(
            "SC RGB, JPEG-LS near-lossless",
            copy("SC_rgb_jls_lossy_line.dcm", Modality="OT"),
            "ot-secondary-capture",
        ),
        Source(
            "OT palette colour, no PatientID",
            copy("OT-PAL-8-face.dcm"),
            "ot-secondary-capture",
        ),
        Source("SM slide, 25 tiles RGB, uncompressed", copy(SLIDES / "sm_image.dcm"), "sm-slide"),
        Source("SM slide, 25 tiles RGB, JPEG-LS", copy(SLIDES / "sm_image_jpegls.dcm"), "sm-slide"),
    ]


def example_2d_rules() -> str:
    """The rules of config/rules.example.toml that match only 2-D modalities, as written
    there, each sending to "pacs"."""
    text = (REPO / "config" / "rules.example.toml").read_text()
    kept = []
    for block in re.split(r"(?m)^(?=\[\[)", text):
        rules = tomllib.loads(block).get("rules") if block.startswith("[[rules]]") else None
        if rules and planar_only_modalities(Rule.model_validate(rules[0]).match):
            kept.append(re.sub(r"(?m)^destinations = .*$", 'destinations = ["pacs"]', block))
    assert len(kept) >= 7, "the example has a rule per 2-D modality"
    return "\n".join(kept)


def send(files: list[Source], port: int) -> None:
    """storescu, one run per transfer syntax (it proposes one compressed syntax a run)."""
    by_syntax: dict[str, list[Path]] = {}
    for source in files:
        by_syntax.setdefault(source.transfer_syntax, []).append(source.path)
    for syntax, paths in by_syntax.items():
        # -R: the files' own SOP classes (storescu's default list has no VL Whole Slide).
        extra = [*PROPOSE[syntax], "-R"]
        result = storescu(paths, port, called_ae="DICOMNODE", extra_args=extra)
        assert result.returncode == 0, (syntax, result.stdout + result.stderr)


@dataclass
class Held:
    """What Orthanc holds of one study: instances by kind, derived ones by SOP class."""

    seg: int = 0
    sr: int = 0
    derived: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.seg + self.sr + sum(self.derived.values())

    def __str__(self) -> str:
        classes = ", ".join(f"{n} {uid}" for uid, n in sorted(self.derived.items()))
        return f"SEG {self.seg}, SR {self.sr}, derived {sum(self.derived.values())} ({classes})"


def census(orthanc: OrthancProcess) -> dict[str, Held]:
    """Study Instance UID -> what Orthanc holds of it."""
    studies: list[dict[str, Any]] = orthanc.get_json("/studies?expand")  # type: ignore[assignment]
    uid_of = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"] for s in studies}
    held: dict[str, Held] = {uid: Held() for uid in uid_of.values()}
    everything: list[dict[str, Any]] = orthanc.get_json("/series?expand")  # type: ignore[assignment]
    for series in everything:
        study = held[uid_of[series["ParentStudy"]]]
        count = len(series["Instances"])
        modality = series["MainDicomTags"].get("Modality")
        if modality == "SEG":
            study.seg += count
        elif modality == "SR":
            study.sr += count
        else:
            first = series["Instances"][0]
            tags: dict[str, Any] = orthanc.get_json(f"/instances/{first}/simplified-tags")  # type: ignore[assignment]
            study.derived[tags["SOPClassUID"]] += count
    return held


def test_2d_images_through_the_example_rules_into_orthanc(tmp_path: Path) -> None:
    files = sources(tmp_path / "sources")
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        config = write_config(
            tmp_path / "node.toml",
            orthanc,
            example_2d_rules() + REFUSED_RULE,
            study_quiet_seconds=1.0,
            dask_workers=2,
            receiver_processes=1,
            job_max_attempts=2,  # the refused job uses one: retrying cannot help
        )
        node = start_node(tmp_path / "data", config=config)
        try:
            send(files, node.port)
            jobs = wait_for_jobs(node, len(files) + 1, ("succeeded", "failed"), timeout=200)
            wait_for_exports(node, timeout=60)
            exports = cli_json(node, "exports")
            failed = cli_json(node, "jobs", "--state", "failed")
        finally:
            node.stop()
        held = census(orthanc)

    assert all(e["state"] == "delivered" for e in exports), exports  # type: ignore[union-attr]
    [refused] = failed  # type: ignore[misc]
    assert refused["rule"] == "dx-volume-model"
    assert (refused["attempts"], refused["max_attempts"]) == (1, 2)
    assert refused["error"].startswith("unet takes 3-D volumes only, and this is a 2-D image")
    assert refused["outputs"] == 0
    by_study: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        if job["state"] == "succeeded":
            by_study.setdefault(job["study_instance_uid"], []).append(job)
    report = []
    for source in files:
        study_uid = source.study_uid
        found = by_study.get(study_uid, [])
        assert len(found) == 1, f"{source.label}: {len(found)} jobs succeeded"
        job = found[0]
        assert job["rule"] == source.rule, source.label
        stored = held.get(study_uid, Held())
        report.append(f"{source.label}: {stored}")
        assert stored.total == job["outputs"], (source.label, str(stored), job)
        assert stored.sr >= 1 and sum(stored.derived.values()) >= 1, (source.label, str(stored))
        assert stored.seg >= 1, (source.label, str(stored))  # cine loops too
    assert set(held) == {source.study_uid for source in files}
    print("\n".join(["", "Orthanc holds, per source:", *report]))
