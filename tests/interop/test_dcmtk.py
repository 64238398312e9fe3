"""DCMTK echoscu/storescu against the node subprocess: content, counts, and refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from interop_support import RECEIVE_ONLY, wait_for_study, with_new_uids
from pydicom import config, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from sqlalchemy import create_engine, select

from db.models import Association
from dicom_node.synthetic import SyntheticSeries
from dicom_node.testing import NodeProcess, echoscu, start_node, storescu

pytestmark = pytest.mark.interop


PRIVATE_SOP_CLASS_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit

[[PresentationContexts]]
[Private]
PresentationContext1 = {sop_class}\\Uncompressed

[[Profiles]]
[Private]
PresentationContexts = Private
"""


def spooled(node: NodeProcess, dataset) -> Path:  # type: ignore[no-untyped-def]
    return (
        node.data_dir
        / "spool"
        / dataset.StudyInstanceUID
        / dataset.SeriesInstanceUID
        / f"{dataset.SOPInstanceUID}.dcm"
    )


def test_echoscu(node_process: NodeProcess) -> None:
    result = echoscu(node_process.port, called_ae="DICOMNODE")
    assert result.returncode == 0, result.stderr


def test_storescu_series_content_and_counts(
    node_process: NodeProcess, ct_series_dir: tuple[SyntheticSeries, Path]
) -> None:
    series, directory = ct_series_dir
    files = sorted(directory.iterdir())
    result = storescu(files, node_process.port, called_ae="DICOMNODE")
    assert result.returncode == 0, result.stderr

    study = wait_for_study(node_process, series.study_instance_uid, len(files))
    assert (study["num_series"], study["num_instances"]) == (1, len(files))
    for path in files:
        sent = dcmread(path)
        received = dcmread(spooled(node_process, sent))
        assert received == sent
    engine = create_engine(node_process.database_url)
    with engine.connect() as connection:
        row = connection.execute(
            select(Association).where(Association.calling_ae_title == "STORESCU")
        ).one()
    engine.dispose()
    assert row.accepted and row.instances_received == len(files)
    assert row.bytes_received > 512 * 512 * 2 * len(files)


@pytest.mark.parametrize(
    ("tool", "propose", "transfer_syntax"),
    [
        ("dcmcjpeg", "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
        ("dcmcjpls", "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
        ("dcmcrle", "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
    ],
)
def test_compressed_ct_stored_as_received(
    node_process: NodeProcess,
    ct_series_dir: tuple[SyntheticSeries, Path],
    tmp_path: Path,
    tool: str,
    propose: str,
    transfer_syntax: str,
) -> None:
    series, _ = ct_series_dir
    source = with_new_uids(series.datasets[0], tmp_path / "source.dcm")
    compressed = tmp_path / "compressed"
    subprocess.run([tool, str(source), str(compressed)], check=True, capture_output=True)
    result = storescu([compressed], node_process.port, called_ae="DICOMNODE", extra_args=[propose])
    assert result.returncode == 0, result.stderr
    sent = dcmread(compressed)
    wait_for_study(node_process, sent.StudyInstanceUID, 1)
    received = dcmread(spooled(node_process, sent))
    assert received.file_meta.TransferSyntaxUID == transfer_syntax
    assert received.PixelData == sent.PixelData  # not transcoded
    assert (received.pixel_array == dcmread(source).pixel_array).all()  # and decodable


def test_jpeg2000_and_deflated_real_files(node_process: NodeProcess) -> None:
    cases = [("MR_small_jp2klossless.dcm", "-xv"), ("image_dfl.dcm", "-xd")]
    for name, propose in cases:
        path = Path(get_testdata_file(name))  # type: ignore[arg-type]
        result = storescu([path], node_process.port, called_ae="DICOMNODE", extra_args=[propose])
        assert result.returncode == 0, result.stderr
    for name, _ in cases:
        sent = dcmread(get_testdata_file(name))
        wait_for_study(node_process, sent.StudyInstanceUID, 1)
        received = dcmread(spooled(node_process, sent))
        assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert received.PixelData == sent.PixelData
        # storescu drops trailing padding and sends odd-length encapsulated data as OB
        ignored = {0x7FE00010, 0xFFFCFFFC}
        assert [e for e in received if e.tag not in ignored] == [
            e for e in sent if e.tag not in ignored
        ]


def test_rejected_calling_ae(tmp_path: Path) -> None:
    node = start_node(
        tmp_path / "data",
        env={
            **RECEIVE_ONLY,
            "DICOM_NODE_ALLOWED_PEERS": '[{"ae_title": "CT_SCANNER", "host": "127.0.0.0/8"}]',
        },
    )
    try:
        assert echoscu(node.port, calling_ae="CT_SCANNER").returncode == 0
        refused = echoscu(node.port, calling_ae="STRANGER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
        assert echoscu(node.port, calling_ae="CT_SCANNER").returncode == 0
    finally:
        node.stop()
    assert '"reason": "calling AE title or address not in the allow-list"' in node.log()


def test_bad_uid_refused_and_node_keeps_serving(
    node_process: NodeProcess, small_ct: SyntheticSeries, tmp_path: Path
) -> None:
    import copy

    dataset = copy.deepcopy(small_ct.datasets[0])
    dataset["SeriesInstanceUID"] = DataElement(
        "SeriesInstanceUID", "UI", "1.2.3/../../../outside", validation_mode=config.IGNORE
    )
    bad = tmp_path / "bad.dcm"
    dataset.save_as(bad, enforce_file_format=True)
    result = storescu([bad], node_process.port, called_ae="DICOMNODE", extra_args=["-v"])
    assert "Error: CannotUnderstand" in result.stdout + result.stderr
    assert not list((node_process.data_dir / "spool").glob(f"{dataset.StudyInstanceUID}/*"))
    assert not list(node_process.data_dir.parent.rglob("outside*"))
    assert echoscu(node_process.port).returncode == 0


def test_unknown_sop_class_is_not_accepted(
    node_process: NodeProcess, small_ct: SyntheticSeries, tmp_path: Path
) -> None:
    import copy

    dataset = copy.deepcopy(small_ct.datasets[0])
    private_class = "1.2.826.0.1.3680043.8.498.1.999"
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = private_class
    odd = tmp_path / "odd.dcm"
    dataset.save_as(odd, enforce_file_format=True)
    result = storescu([odd], node_process.port, called_ae="DICOMNODE")
    assert result.returncode != 0
    assert "no presentation context" in (result.stdout + result.stderr).lower()
    assert echoscu(node_process.port).returncode == 0


def test_unknown_sop_class_accepted_when_configured(
    small_ct: SyntheticSeries, tmp_path: Path
) -> None:
    import copy

    dataset = copy.deepcopy(small_ct.datasets[0])
    siemens_csa_non_image = "1.3.12.2.1107.5.9.1"
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = siemens_csa_non_image
    private = with_new_uids(dataset, tmp_path / "csa.dcm")
    node = start_node(
        tmp_path / "data", env={**RECEIVE_ONLY, "DICOM_NODE_ACCEPT_UNKNOWN_SOP_CLASSES": "true"}
    )
    try:
        # storescu proposes SOP classes it does not know only from a negotiation profile
        profile = tmp_path / "private.cfg"
        profile.write_text(PRIVATE_SOP_CLASS_PROFILE.format(sop_class=siemens_csa_non_image))
        result = storescu(
            [private],
            node.port,
            called_ae="DICOMNODE",
            extra_args=["-xf", str(profile), "Private"],
        )
        assert result.returncode == 0, result.stderr
        sent = dcmread(private)
        assert dcmread(spooled(node, sent)) == sent
        wait_for_study(node, sent.StudyInstanceUID, 1)
    finally:
        node.stop()
