"""`dicom-node process`: a folder in, SEG / SR / derived series out, offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from db.models import Output
from dicom_node.cli import app
from dicom_node.process import NoUsableSeriesError, build_steps, process_directory
from dicom_node.synthetic import generate_series
from dicom_node.volume import load_directory
from processors.api import run_processor
from processors.base import LabelResult

runner = CliRunner()


def outputs(folder: Path) -> dict[str, pydicom.Dataset]:
    """Every written instance by its path relative to ``folder``."""
    return {str(p.relative_to(folder)): pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))}


def test_generated_series_twice_gives_the_same_files(tmp_path: Path) -> None:
    series = generate_series(num_slices=8, rows=64, columns=64, uid_seed="process")
    series.write(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    args = ["process", str(tmp_path / "in"), "--pipeline", "gaussian,threshold_segment"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "processed 1 series" in first.output
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output

    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a.keys() == b.keys()
    assert {k: d.SOPInstanceUID for k, d in a.items()} == {
        k: d.SOPInstanceUID for k, d in b.items()
    }
    kinds = {Path(k).parts[2].split("-")[0] for k in a}
    assert kinds == {"derived", "seg", "sr"}
    derived = [d for k, d in a.items() if "/derived-" in k]
    assert len(derived) == 8 and all(
        d.SOPClassUID == series.datasets[0].SOPClassUID for d in derived
    )
    assert {d.StudyInstanceUID for d in a.values()} == {series.study_instance_uid}

    # The SEG (of the denoised image) references the source instances and equals the
    # label map that the same pipeline gives in memory.
    (seg_key,) = [k for k in a if "/seg-" in k]
    seg = hd.seg.Segmentation.from_dataset(a[seg_key])
    volume = load_directory(tmp_path / "in", "*.dcm")
    smoothed = run_processor("gaussian", volume)[0].volume  # type: ignore[union-attr]
    labels = run_processor("threshold_segment", smoothed)[0]
    assert isinstance(labels, LabelResult)
    pixels = seg.get_pixels_by_source_instance(
        list(volume.sop_instance_uids), combine_segments=True, assert_missing_frames_are_empty=True
    )
    assert np.array_equal(pixels, labels.labels)
    (sr_key,) = [k for k in a if "/sr-" in k]
    assert Path(seg_key).parts[1] == "02-threshold_segment"
    sr = hd.sr.Comprehensive3DSR.from_dataset(a[sr_key])
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID


def test_real_file_and_database_record(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct")
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    result = runner.invoke(
        app,
        [
            "process",
            str(folder),
            "-p",
            "kmeans",
            "-o",
            str(tmp_path / "out"),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    written = outputs(tmp_path / "out")
    assert sorted(Path(k).parts[2] for k in written) == ["seg-0", "sr-0"]
    source = pydicom.dcmread(folder / "ct")
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'dicom-node.db'}")
    with Session(engine) as session:
        rows = session.scalars(select(Output).order_by(Output.kind)).all()
        assert [r.kind for r in rows] == ["seg", "sr"]
        for row in rows:
            assert row.source_series_uid == source.SeriesInstanceUID
            assert row.processor_name == "kmeans" and row.processor_version == "2.0.0"
            assert row.params["k"] == 3 and Path(row.path).is_file()
            assert pydicom.dcmread(row.path).SOPInstanceUID == row.sop_instance_uid
    engine.dispose()


def test_uid_root_option(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    result = runner.invoke(
        app,
        [
            "process",
            str(folder),
            "-p",
            "gaussian",
            "-o",
            str(tmp_path / "out"),
            "--uid-root",
            "1.2.3.4",
        ],
    )
    assert result.exit_code == 0, result.output
    (ds,) = outputs(tmp_path / "out").values()
    assert ds.SOPInstanceUID.startswith("1.2.3.4.") and ds.SeriesInstanceUID.startswith("1.2.3.4.")
    assert not (tmp_path / "data").exists()  # no --config: no database


def test_errors_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    result = runner.invoke(app, ["process", str(empty), "-p", "kmeans", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no DICOM image series" in result.output

    series = generate_series(num_slices=3, rows=32, columns=32, uid_seed="bad")
    del series.datasets[1].ImagePositionPatient
    series.write(tmp_path / "broken")
    result = runner.invoke(
        app, ["process", str(tmp_path / "broken"), "-p", "kmeans", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "no usable series" in result.output
    assert "ImagePositionPatient" in result.output

    result = runner.invoke(app, ["process", str(empty), "-p", "no_such", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no_such" in result.output
    with pytest.raises(NoUsableSeriesError):
        process_directory(empty, tmp_path / "o", build_steps(["kmeans"]))


def test_params_reach_the_processor_and_the_provenance(tmp_path: Path) -> None:
    series = generate_series(num_slices=4, rows=32, columns=32, uid_seed="params")
    series.write(tmp_path / "in")
    base = ["process", str(tmp_path / "in"), "-p", "kmeans"]
    result = runner.invoke(app, [*base, "-o", str(tmp_path / "k2"), "--param", "kmeans.k=2"])
    assert result.exit_code == 0, result.output
    default = runner.invoke(app, [*base, "-o", str(tmp_path / "k3")])
    assert default.exit_code == 0, default.output
    (k2,) = [d for k, d in outputs(tmp_path / "k2").items() if "/seg-" in k]
    (k3,) = [d for k, d in outputs(tmp_path / "k3").items() if "/seg-" in k]
    assert len(k2.SegmentSequence) == 2 and len(k3.SegmentSequence) == 3
    algorithm = k2.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "k=2" in algorithm.AlgorithmParameters
    assert k2.SOPInstanceUID != k3.SOPInstanceUID  # the parameters enter the UIDs

    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "x"), "--param", "kmeans.k=0"])
    assert bad.exit_code == 2 and "invalid parameters" in bad.output and "k" in bad.output
    stray = runner.invoke(app, [*base, "-o", str(tmp_path / "x"), "--param", "gaussian.sigma_mm=2"])
    assert stray.exit_code == 2 and "not in the pipeline" in stray.output
    malformed = runner.invoke(app, [*base, "-o", str(tmp_path / "x"), "--param", "k=2"])
    assert malformed.exit_code == 2 and "PROCESSOR.KEY=VALUE" in malformed.output


def test_a_segmentation_that_finds_nothing_writes_no_object(tmp_path: Path) -> None:
    series = generate_series(num_slices=3, rows=32, columns=32, uid_seed="nothing")
    series.write(tmp_path / "in")
    report = process_directory(
        tmp_path / "in",
        tmp_path / "out",
        build_steps(
            ["threshold_segment", "gaussian"],
            params={"threshold_segment": {"preset": "custom", "lower": 5000}},
        ),
    )
    assert report.processed == [series.series_instance_uid]
    assert {r.kind for r in report.outputs} == {"derived"}


def test_real_enhanced_ct_gets_seg_and_sr_when_no_derived_series_can_be_made(
    tmp_path: Path,
) -> None:
    """pydicom-data's enhanced (multi-frame) CT: the SEG and SR are written and the
    derived series that multi-frame sources cannot have yet is reported, not fatal."""
    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file("eCT_Supplemental.dcm"), tmp_path / "in" / "ect")  # type: ignore[arg-type]
    result = runner.invoke(
        app,
        [
            "process",
            str(tmp_path / "in"),
            "-p",
            "gaussian,threshold_segment,features",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "no derived series" in result.output
    kinds = sorted(p.parent.name.split("-")[0] for p in (tmp_path / "out").rglob("*.dcm"))
    assert kinds == ["seg", "sr", "sr"]


def test_freed_memory_goes_back_to_the_system() -> None:
    """Blocks of 1 MiB or more are mapped on their own and unmapped when freed, whatever
    glibc's threshold had grown to (it follows the largest block freed): holes left
    between blocks still held do not stay resident."""
    script = """
import os, numpy as np
from dicom_node.process import return_freed_memory_promptly
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert return_freed_memory_promptly()
big = np.ones(24 << 20, dtype=np.uint8); del big
before = rss()
blocks = [np.ones(4 << 20, dtype=np.uint8) for _ in range(32)]
del blocks[::2]  # holes between the blocks still held: a heap could not shrink past them
print((rss() - before - (64 << 20)) >> 20)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert int(result.stdout.strip()) <= 4, result.stdout


def test_an_output_written_again_is_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job run again writes its outputs over the first run's, which the exporter may be
    sending: a write that fails half-way leaves the earlier file as it was, and nothing
    partial behind."""
    import dicom_node.process as process

    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "out" / "seg-1.dcm"
    process._write(dataset, path, None)
    first = path.read_bytes()

    def half_written(ds: pydicom.Dataset, target: Path, keys: object) -> None:
        target.write_bytes(first[: len(first) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(process, "save_dataset", half_written)
    with pytest.raises(OSError, match="disk full"):
        process._write(dataset, path, None)
    assert path.read_bytes() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["seg-1.dcm"]
