"""Real peers sending to the node subprocess (two receiver processes): DCMTK ``dcmsend``,
pynetdicom's SCU, and Orthanc through its REST API (DCMTK ``storescu`` is in
``test_dcmtk.py``). Every instance must be stored as sent and indexed."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from interop_support import wait_for_study
from pydicom import DataElement, Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.synthetic import generate_series
from dicom_node.testing import (
    NodeProcess,
    OrthancProcess,
    dcmtk_env,
    require_tool,
    running_node,
    running_orthanc,
    start_node,
    storescu,
)
from tests.dicom_node.ae.raw_peer import dataset_after_file_meta

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def node_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """conftest's node (two receiver processes) without the Dask cluster: only receiving
    is tested here, and the cluster takes seconds to start."""
    directory = tmp_path_factory.mktemp("node")
    environment = {"DICOM_NODE_RECEIVER_PROCESSES": "2", "DICOM_NODE_EXECUTOR": "inline"}
    with running_node(directory / "data", env=environment) as node:
        yield node


# Real files of other SOP classes and transfer syntaxes, from pydicom's test data.
COMPRESSED_AND_OTHER_ENCODINGS = [
    "MR_small_implicit.dcm",  # implicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "image_dfl.dcm",  # deflated explicit VR little endian
    "JPEG-LL.dcm",  # JPEG lossless, first-order prediction
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
]


def spooled(node: NodeProcess, dataset: Dataset) -> Path:
    return (
        node.data_dir
        / "spool"
        / str(dataset.StudyInstanceUID)
        / str(dataset.SeriesInstanceUID)
        / f"{dataset.SOPInstanceUID}.dcm"
    )


TRAILING_PADDING = 0xFFFCFFFC  # DCMTK drops it


def public_elements(dataset: Dataset) -> list[DataElement]:
    return [e for e in dataset if not e.tag.is_private and e.tag != TRAILING_PADDING]


def assert_stored_as_sent(node: NodeProcess, sent: Path, *, exact: bool = True) -> None:
    """The node's file holds the data set exactly as ``sent`` encodes it.

    Where the sender converted the data set to another transfer syntax the node chose
    (DCMTK offers its compressed file and the uncompressed syntaxes in one context), the
    public elements and pixels must be equal (implicit VR loses private elements' VRs).
    ``exact=False`` for compressed files relayed by a sender that re-encodes the header
    (DCMTK drops trailing padding): then the pixel data must be the bytes sent.
    """
    dataset = dcmread(sent)
    stored = spooled(node, dataset)
    received = dcmread(stored)
    if received.file_meta.TransferSyntaxUID != dataset.file_meta.TransferSyntaxUID:
        assert (received.pixel_array == dataset.pixel_array).all(), sent.name
        del received.PixelData, dataset.PixelData
        assert public_elements(received) == public_elements(dataset), sent.name
    elif exact or not dataset.file_meta.TransferSyntaxUID.is_compressed:
        assert dataset_after_file_meta(stored) == dataset_after_file_meta(sent), sent.name
    else:
        assert received.PixelData == dataset.PixelData, sent.name


def into_study(source: Path, study_instance_uid: str, destination: Path) -> Path:
    """A copy of ``source`` as a new series and instance of the given study."""
    dataset = copy.deepcopy(dcmread(source))
    dataset.StudyInstanceUID = study_instance_uid
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    destination.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(destination, enforce_file_format=True)
    return destination


def study_with_other_encodings(directory: Path, seed: str, num_slices: int) -> list[Path]:
    """A CT series of ``num_slices`` plus the files of other encodings, all one study."""
    series = generate_series(num_slices=num_slices, rows=128, columns=128, uid_seed=seed)
    files = series.write(directory / "ct")
    for name in COMPRESSED_AND_OTHER_ENCODINGS:
        source = Path(get_testdata_file(name))  # type: ignore[arg-type]
        files.append(into_study(source, series.study_instance_uid, directory / "other" / name))
    return files


def dcmsend(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("dcmsend"),
            "-aet",
            "DCMSEND",
            "-aec",
            "DICOMNODE",
            "127.0.0.1",
            str(port),
            *args,
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dcmsend_series(node_process: NodeProcess, tmp_path: Path) -> None:
    series = generate_series(num_slices=8, rows=128, columns=128, uid_seed="dcmsend-series")
    files = series.write(tmp_path)
    result = dcmsend(node_process.port, *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_study(node_process, series.study_instance_uid, len(files))
    for path in files:
        assert_stored_as_sent(node_process, path)


def test_dcmsend_scans_directories(node_process: NodeProcess, tmp_path: Path) -> None:
    files = study_with_other_encodings(tmp_path / "export", "dcmsend-scan", num_slices=4)
    result = dcmsend(node_process.port, "--scan-directories", "--recurse", str(tmp_path / "export"))
    assert result.returncode == 0, result.stdout + result.stderr
    study_instance_uid = dcmread(files[0]).StudyInstanceUID
    wait_for_study(node_process, study_instance_uid, len(files))
    for path in files:
        assert_stored_as_sent(node_process, path, exact=False)


def test_dcmsend_gets_the_transfer_syntax_of_its_files(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    """dcmsend offers a file's own transfer syntax first, then the uncompressed ones it
    could convert to. The node takes the file's own: a compressed image stays as the
    modality compressed it (not decompressed to 3x the bytes on the wire), and explicit
    VR keeps the value representation of private elements."""
    series = generate_series(num_slices=1, rows=64, columns=64, uid_seed="dcmsend-syntax")
    files = series.write(tmp_path / "ct")
    for name in ("JPEG-LL.dcm", "MR_small_RLE.dcm"):
        source = Path(get_testdata_file(name))  # type: ignore[arg-type]
        files.append(into_study(source, series.study_instance_uid, tmp_path / name))
    result = dcmsend(node_process.port, *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_study(node_process, series.study_instance_uid, len(files))
    for path in files:
        sent = dcmread(path, stop_before_pixels=True)
        received = dcmread(spooled(node_process, sent), stop_before_pixels=True)
        assert received.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, (
            f"{path.name}: the node chose {received.file_meta.TransferSyntaxUID.name}"
        )
        assert_stored_as_sent(node_process, path, exact=False)


def test_pynetdicom_scu_many_contexts_one_association(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    files = study_with_other_encodings(tmp_path, "pynetdicom-scu", num_slices=6)
    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for context in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*context)
    assoc = ae.associate("127.0.0.1", node_process.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert len(assoc.accepted_contexts) == len(ae.requested_contexts)
        assert assoc.send_c_echo().Status == 0
        statuses = [
            assoc.send_c_store(dataset, msg_id=number).Status
            for number, dataset in enumerate(datasets, start=1)
        ]
        assert assoc.send_c_echo(msg_id=len(datasets) + 1).Status == 0
    finally:
        assoc.release()
    assert statuses == [0] * len(datasets)
    wait_for_study(node_process, datasets[0].StudyInstanceUID, len(datasets))
    for path in files:
        assert_stored_as_sent(node_process, path)


def orthanc_request(orthanc: OrthancProcess, method: str, path: str, body: bytes) -> Any:
    request = urllib.request.Request(f"{orthanc.url}{path}", data=body, method=method)
    # Only ever our own loopback Orthanc over http.
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read() or b"null")


def test_orthanc_stores_to_the_node_through_its_rest_api(
    node_process: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TCP_NODELAY", "1")  # Orthanc's DICOM side is DCMTK (see testing.py)
    files = study_with_other_encodings(tmp_path / "study", "orthanc-sender", num_slices=6)
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        uploaded = [
            orthanc_request(orthanc, "POST", "/instances", path.read_bytes()) for path in files
        ]
        modality = {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node_process.port}
        orthanc_request(orthanc, "PUT", "/modalities/dicomnode", json.dumps(modality).encode())
        job = {"Resources": [item["ID"] for item in uploaded], "Synchronous": True}
        result = orthanc_request(
            orthanc, "POST", "/modalities/dicomnode/store", json.dumps(job).encode()
        )
    assert (result["InstancesCount"], result["FailedInstancesCount"]) == (len(files), 0)
    wait_for_study(node_process, dcmread(files[0]).StudyInstanceUID, len(files))
    for path in files:
        assert_stored_as_sent(node_process, path, exact=False)


MULTI_FRAME_ROWS = MULTI_FRAME_COLUMNS = 512
MULTI_FRAMES = 400  # 512 x 512 x 2 bytes x 400 frames: 200 MiB of pixel data
MAX_NODE_GROWTH = 100 * 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def write_multi_frame(path: Path) -> Path:
    dataset = Dataset()
    dataset.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"
    dataset.PatientID = "SYN-LARGE"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.NumberOfFrames = MULTI_FRAMES
    dataset.Rows, dataset.Columns = MULTI_FRAME_ROWS, MULTI_FRAME_COLUMNS
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    pixels = np.random.default_rng(15).integers(
        0, 4096, (MULTI_FRAMES, MULTI_FRAME_ROWS, MULTI_FRAME_COLUMNS), dtype=np.uint16
    )
    dataset.PixelData = pixels.tobytes()
    del pixels
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for parent in pids:
        for task in Path(f"/proc/{parent}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class PeakSampler(threading.Thread):
    """The largest total RSS of a set of processes, sampled every 10 ms."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.baseline = resident_bytes(pids)
        self.peak = self.baseline
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.01):
            self.peak = max(self.peak, resident_bytes(self.pids))


def data_set_digest(path: Path) -> str:
    _, offset = split_dataset(path)
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        stream.seek(offset)
        while chunk := stream.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_a_200_mb_multi_frame_instance_is_streamed_to_disk(tmp_path: Path) -> None:
    """The node writes a large instance as it arrives: its memory (all its processes)
    grows by less than 100 MB while storescu sends 200 MB."""
    sent = write_multi_frame(tmp_path / "multi-frame.dcm")
    node = start_node(
        tmp_path / "data",
        env={"DICOM_NODE_RECEIVER_PROCESSES": "2", "DICOM_NODE_EXECUTOR": "inline"},
    )
    try:
        time.sleep(1.0)  # let the receivers settle before the baseline
        sampler = PeakSampler(process_tree(node.process.pid))
        sampler.start()
        result = storescu([sent], node.port, called_ae="DICOMNODE")
        sampler.done.set()
        sampler.join()
        assert result.returncode == 0, result.stdout + result.stderr
        stored = spooled(node, dcmread(sent, stop_before_pixels=True))
        assert data_set_digest(stored) == data_set_digest(sent)
        growth = sampler.peak - sampler.baseline
        print(f"node memory growth while receiving 200 MB: {growth / 2**20:.0f} MiB")
        assert growth < MAX_NODE_GROWTH, f"the node grew by {growth / 2**20:.0f} MiB"
    finally:
        node.stop()
