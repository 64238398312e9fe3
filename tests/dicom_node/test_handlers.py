"""The SCP in-process: statuses for good and bad input, real files of many SOP classes and
transfer syntaxes, duplicates, and the allow-list."""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pytest
from pydicom import config, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config, build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from db.models import Association, Instance
from dicom_node.ae.pynetdicom_internals import paused_reactor
from dicom_node.config import DuplicatePolicy, Settings
from dicom_node.node import Node
from dicom_node.scu import echo, scan_files, send
from dicom_node.security.crypto import MAGIC, read_dicom
from dicom_node.security.keys import KeyRing, write_key_file
from dicom_node.storage import EncryptedIncomingFile
from dicom_node.synthetic import SyntheticSeries
from dicom_node.testing import local_settings

ACCEPTED_REAL_FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian
    "MR_small_implicit.dcm",  # implicit VR
    "MR_small_bigendian.dcm",  # explicit VR big endian (retired, still sent)
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "JPEG-lossy.dcm",  # JPEG baseline 8-bit... extended process 2/4
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPEG-LL.dcm",  # JPEG lossless process 14 SV1
    "image_dfl.dcm",  # deflated explicit VR little endian
    "rtdose.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "test-SR.dcm",
    "waveform_ecg.dcm",
    "US1_J2KR.dcm",  # multi-frame ultrasound, JPEG 2000
    "eCT_Supplemental.dcm",  # enhanced CT, multi-frame
    "emri_small_jpeg_ls_lossless.dcm",  # enhanced MR
    "liver.dcm",  # segmentation
    "examples_palette.dcm",
    "ExplVR_BigEndNoMeta.dcm",  # no preamble, no file meta, big endian
]
# Anonymised without Study/Series Instance UIDs: refused, never filed under a made-up path.
REFUSED_REAL_FILES = ["JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm"]


def send_paths(node: Node, paths: list[Path], calling_ae: str = "TESTSCU"):  # type: ignore[no-untyped-def]
    files, skipped = scan_files(paths)
    assert not skipped
    return send(
        files, "127.0.0.1", node.settings.port, calling_ae=calling_ae, called_ae="DICOMNODE"
    )


def spooled_files(spool_dir: Path) -> list[Path]:
    """Every file in the spool, temp files included."""
    return [path for path in spool_dir.rglob("*") if path.is_file()]


def count_instances(node: Node) -> int:
    assert node.indexer is not None and node.sessions is not None
    assert node.indexer.flush()
    with node.sessions() as session:
        return session.scalar(select(func.count(Instance.id))) or 0


def test_echo(node: Node) -> None:
    assert echo("127.0.0.1", node.settings.port, calling_ae="T", called_ae="DICOMNODE") == 0


def test_store_keeps_dataset_as_received(
    node: Node, small_ct: SyntheticSeries, tmp_path: Path
) -> None:
    paths = small_ct.write(tmp_path / "in")
    report = send_paths(node, paths)
    assert report.sent == len(paths) and not report.failed
    assert count_instances(node) == len(paths)
    for path, dataset in zip(paths, small_ct.datasets, strict=True):
        stored = node.settings.spool_dir / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
        received = dcmread(stored / f"{dataset.SOPInstanceUID}.dcm")
        original = dcmread(path)
        assert received == original  # every element, pixel data included
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert received.file_meta.SourceApplicationEntityTitle == "TESTSCU"


@pytest.mark.parametrize("name", ACCEPTED_REAL_FILES)
def test_real_files_of_many_sop_classes_and_transfer_syntaxes(node: Node, name: str) -> None:
    source = Path(get_testdata_file(name))  # type: ignore[arg-type]
    report = send_paths(node, [source])
    assert report.sent == 1, report.failed
    assert count_instances(node) == 1
    with node.sessions() as session:  # type: ignore[misc]
        instance = session.scalars(select(Instance)).one()
    original = dcmread(source, force=True)
    received = dcmread(instance.path)
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.PixelData == original.PixelData if "PixelData" in original else True
    assert received.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
    if "TransferSyntaxUID" in getattr(original, "file_meta", {}):
        assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", REFUSED_REAL_FILES)
def test_real_files_without_study_uid_are_refused(node: Node, name: str) -> None:
    report = send_paths(node, [Path(get_testdata_file(name))])  # type: ignore[arg-type]
    assert report.sent == 0
    assert "0xC000" in report.failed[0][1]
    assert count_instances(node) == 0
    assert spooled_files(node.settings.spool_dir) == []


def _raw_store(port: int, dataset, affected_sop_class: str, affected_sop_instance: str) -> int:  # type: ignore[no-untyped-def]
    """A C-STORE whose request and dataset may disagree (no well-behaved SCU sends this)."""
    ae = AE(ae_title="RAWSCU")
    ae.requested_contexts = [build_context(affected_sop_class, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = affected_sop_class
        request.AffectedSOPInstanceUID = affected_sop_instance
        request.Priority = 2
        if isinstance(dataset, bytes):
            request.DataSet = BytesIO(dataset)
        else:
            request.DataSet = BytesIO(encode(dataset, False, True))
        context = assoc.accepted_contexts[0]
        with paused_reactor(assoc):
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        return int(response.Status)
    finally:
        assoc.release()


def test_dataset_not_matching_request_sop_class(node: Node, small_ct: SyntheticSeries) -> None:
    dataset = small_ct.datasets[0]
    status = _raw_store(node.settings.port, dataset, MRImageStorage, dataset.SOPInstanceUID)
    assert status == 0xA900
    status = _raw_store(node.settings.port, dataset, CTImageStorage, "1.2.3.4.999")
    assert status == 0xA900
    assert count_instances(node) == 0


def test_unparseable_dataset_then_node_still_serves(node: Node, small_ct: SyntheticSeries) -> None:
    garbage = b"\x08\x00\x16\x00ZZ\x04\x00abcd"  # a VR that does not exist
    assert _raw_store(node.settings.port, garbage, CTImageStorage, "1.2.3") == 0xC000
    assert echo("127.0.0.1", node.settings.port, calling_ae="T", called_ae="X") == 0


def test_invalid_uid_refused_and_never_a_path(node: Node, small_ct: SyntheticSeries) -> None:
    dataset = copy.deepcopy(small_ct.datasets[0])
    dataset["StudyInstanceUID"] = DataElement(
        "StudyInstanceUID", "UI", "../../../escape", validation_mode=config.IGNORE
    )
    status = _raw_store(node.settings.port, dataset, CTImageStorage, dataset.SOPInstanceUID)
    assert status == 0xC000
    data_dir = node.settings.data_dir
    assert not any("escape" in str(p) for p in data_dir.parent.rglob("*"))
    assert spooled_files(node.settings.spool_dir) == []


@pytest.mark.parametrize(
    ("policy", "expected_status", "kept"),
    [
        (DuplicatePolicy.OVERWRITE, 0x0000, "second"),
        (DuplicatePolicy.KEEP_FIRST, 0x0000, "first"),
        (DuplicatePolicy.REJECT, 0xC000, "first"),
    ],
)
def test_duplicate_policies(
    tmp_path: Path,
    small_ct: SyntheticSeries,
    policy: DuplicatePolicy,
    expected_status: int,
    kept: str,
) -> None:
    running = Node(local_settings(tmp_path, duplicate_policy=policy))
    running.start()
    try:
        dataset = copy.deepcopy(small_ct.datasets[0])
        dataset.SeriesDescription = "first"
        assert (
            _raw_store(running.settings.port, dataset, CTImageStorage, dataset.SOPInstanceUID) == 0
        )
        dataset.SeriesDescription = "second"
        status = _raw_store(running.settings.port, dataset, CTImageStorage, dataset.SOPInstanceUID)
        assert status == expected_status
        assert count_instances(running) == 1
        with running.sessions() as session:  # type: ignore[misc]
            path = session.scalars(select(Instance.path)).one()
        assert dcmread(path).SeriesDescription == kept
    finally:
        running.stop(1)


def test_allow_list_rejects_unknown_calling_ae(tmp_path: Path, small_ct: SyntheticSeries) -> None:
    from dicom_node.scu import AssociationFailedError

    settings: Settings = local_settings(
        tmp_path, allowed_peers=[{"ae_title": "CT_SCANNER", "host": "127.0.0.1"}]
    )
    running = Node(settings)
    running.start()
    try:
        assert echo("127.0.0.1", settings.port, calling_ae="CT_SCANNER", called_ae="X") == 0
        with pytest.raises(AssociationFailedError, match="rejected"):
            echo("127.0.0.1", settings.port, calling_ae="INTRUDER", called_ae="X")
        assert running.indexer is not None and running.indexer.flush()
        with running.sessions() as session:  # type: ignore[misc]
            rows = {a.calling_ae_title: a for a in session.scalars(select(Association))}
        assert rows["CT_SCANNER"].accepted and rows["CT_SCANNER"].status == "released"
        assert not rows["INTRUDER"].accepted and rows["INTRUDER"].status == "rejected"
        assert rows["INTRUDER"].reject_reason == "calling AE title or address not in the allow-list"
    finally:
        running.stop(1)


def test_called_ae_title_check(tmp_path: Path) -> None:
    from dicom_node.scu import AssociationFailedError

    settings = local_settings(tmp_path, require_called_ae_title=True)
    running = Node(settings)
    running.start()
    try:
        assert echo("127.0.0.1", settings.port, calling_ae="A", called_ae="DICOMNODE") == 0
        with pytest.raises(AssociationFailedError, match="rejected"):
            echo("127.0.0.1", settings.port, calling_ae="A", called_ae="WRONG")
    finally:
        running.stop(1)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_spool_write_failure_is_out_of_resources(
    node: Node, small_ct: SyntheticSeries, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The disk fills while the dataset streams in, or at the fsync: 0xA700, no file left."""
    import errno

    from dicom_node import storage

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "write":
        monkeypatch.setattr(storage.IncomingFile, "write", disk_full)
    else:
        monkeypatch.setattr(storage.os, "fsync", disk_full)
    dataset = small_ct.datasets[0]
    assert _raw_store(node.settings.port, dataset, CTImageStorage, dataset.SOPInstanceUID) == 0xA700
    monkeypatch.undo()
    assert spooled_files(node.settings.spool_dir) == []
    assert _raw_store(node.settings.port, dataset, CTImageStorage, dataset.SOPInstanceUID) == 0
    assert count_instances(node) == 1
    assert len(spooled_files(node.settings.spool_dir)) == 1


def test_invalid_values_are_stored_as_received_and_indexed(
    node: Node, small_ct: SyntheticSeries
) -> None:
    """The receive path never converts a received value, so it needs no validation switch:
    under pydicom's strictest reading mode a dataset with invalid values is still stored."""
    dataset = copy.deepcopy(small_ct.datasets[0])
    for keyword, vr, value in [
        ("SeriesNumber", "IS", "0000000000000012"),  # 16 characters, IS allows 12
        ("SeriesDescription", "LO", "x" * 70),  # LO allows 64
        ("StudyDate", "DA", "2023-13-45"),
        ("FrameOfReferenceUID", "UI", "1.2.abc"),
    ]:
        dataset[keyword] = DataElement(keyword, vr, value, validation_mode=config.IGNORE)
    sent = encode(dataset, False, True)
    with config.strict_reading():
        assert _raw_store(node.settings.port, sent, CTImageStorage, dataset.SOPInstanceUID) == 0
        assert count_instances(node) == 1
    with node.sessions() as session:  # type: ignore[misc]
        instance = session.scalars(select(Instance)).one()
        series = instance.series
        indexed = (series.series_number, series.series_description, series.study.study_date)
        assert indexed == (12, "x" * 64, "2023-13-")
    assert Path(instance.path).read_bytes().endswith(sent)


def _accepts_sop_class(port: int, sop_class: str) -> bool:
    ae = AE(ae_title="RAWSCU")
    ae.requested_contexts = [build_context(sop_class, [ExplicitVRLittleEndian])]
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    try:
        return bool(assoc.accepted_contexts)
    finally:
        assoc.release()


def test_unknown_sop_classes_accepted_only_by_a_node_that_allows_them(
    tmp_path: Path, small_ct: SyntheticSeries
) -> None:
    """Each node's own setting decides, even two nodes in one process (no pynetdicom
    process-wide switch is involved any more)."""
    dataset = copy.deepcopy(small_ct.datasets[0])
    dataset.SOPClassUID = siemens_csa_non_image = "1.3.12.2.1107.5.9.1"
    accepting = Node(local_settings(tmp_path / "accepting", accept_unknown_sop_classes=True))
    accepting.start()
    try:
        assert _accepts_sop_class(accepting.settings.port, siemens_csa_non_image)
        port, uid = accepting.settings.port, dataset.SOPInstanceUID
        assert _raw_store(port, dataset, siemens_csa_non_image, uid) == 0
        assert count_instances(accepting) == 1
        refusing = Node(local_settings(tmp_path / "refusing"))
        refusing.start()
        try:
            assert not _accepts_sop_class(refusing.settings.port, siemens_csa_non_image)
            assert _accepts_sop_class(accepting.settings.port, siemens_csa_non_image)
        finally:
            refusing.stop(1)
    finally:
        accepting.stop(1)
    assert _config.UNRESTRICTED_STORAGE_SERVICE is False


def test_a_node_with_a_key_file_spools_what_it_receives_encrypted(
    tmp_path: Path, small_ct: SyntheticSeries, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real files (deflated, big endian among them) and a header longer than the bytes the
    handler keeps in memory, which it then reads back from the encrypted file: all stored
    encrypted, indexed, and read back exactly as sent."""
    write_key_file(tmp_path / "key", [KeyRing.generate().keys[0]])
    keys = KeyRing.from_file(tmp_path / "key")
    long_header = copy.deepcopy(small_ct.datasets[0])
    long_header.private_block(0x0009, "TEST", create=True).add_new(0x01, "OB", bytes(100_000))
    names = ["CT_small.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"]
    sources = [Path(get_testdata_file(name)) for name in names]  # type: ignore[arg-type]
    read_back: list[str] = []
    reading = EncryptedIncomingFile.open_for_reading

    def spied(self: EncryptedIncomingFile) -> BinaryIO:
        read_back.append("header")
        return reading(self)

    monkeypatch.setattr(EncryptedIncomingFile, "open_for_reading", spied)
    node = Node(local_settings(tmp_path, spool_encryption_key_file=tmp_path / "key"))
    node.start()
    try:
        assert send_paths(node, sources).sent == len(sources)
        uid = long_header.SOPInstanceUID
        assert not read_back
        assert _raw_store(node.settings.port, long_header, CTImageStorage, uid) == 0
        assert read_back == ["header"]  # past the bytes kept in memory: read from the file
        assert count_instances(node) == len(sources) + 1
        with node.sessions() as session:  # type: ignore[misc]
            stored = {
                row.sop_instance_uid: Path(row.path) for row in session.scalars(select(Instance))
            }
    finally:
        node.stop(1)
    for original in [*(dcmread(path, force=True) for path in sources), long_header]:
        path = stored[original.SOPInstanceUID]
        data = path.read_bytes()
        assert data.startswith(MAGIC) and b"CompressedSamples" not in data
        assert read_dicom(path, keys) == original
    assert set(spooled_files(node.settings.spool_dir)) == set(stored.values())
