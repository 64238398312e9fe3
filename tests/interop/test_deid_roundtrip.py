"""The de-identification round trip: the node sends a study de-identified to an outside
"AI service" (a pynetdicom SCP in this process), which checks it holds no PHI, makes a SEG
with highdicom on what it received and C-STOREs it back; the node re-identifies the SEG
and sends it on to Orthanc as PACS, with the original patient and UIDs restored."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import SegmentationStorage  # type: ignore[attr-defined]

from dicom_node.scu import scan_files, send
from dicom_node.security.keys import write_key_file
from dicom_node.synthetic import generate_series
from dicom_node.testing import OrthancProcess, free_port, running_node, running_orthanc

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-778899", "PatientBirthDate": "19610203"}
SLICES = 4


class OutsideService:
    """A stand-in for an outside AI service: stores what it receives, in memory."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.raw: list[bytes] = []
        self.port = free_port()
        self.ae = AE(ae_title="OUTSIDEAI")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.lock = threading.Lock()

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        with self.lock:
            self.received.append(ds)
            self.raw.append(buffer.getvalue())
        return 0x0000

    def __enter__(self) -> OutsideService:
        server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self.server = server
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()

    def wait_for(self, count: int, timeout: float) -> list[Dataset]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.2)
        raise AssertionError(f"the outside service got {len(self.received)} of {count}")

    def send_back(self, dataset: Dataset, port: int) -> int:
        ae = AE(ae_title="OUTSIDEAI")
        ae.add_requested_context(SegmentationStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established
        status = assoc.send_c_store(dataset)
        assoc.release()
        return int(status.Status)


def make_seg(sources: list[Dataset]) -> hd.seg.Segmentation:
    sources = sorted(sources, key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[:, 10:30, 10:30] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="finding",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologic"),
        segmented_property_type=hd.sr.CodedConcept("4147007", "SCT", "Mass"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="outside-ai", version="1", family=hd.sr.CodedConcept("123109", "DCM", "AI")
        ),
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Outside AI",
        manufacturer_model_name="stand-in",
        software_versions="1",
        device_serial_number="1",
    )


def orthanc_segs(orthanc: OrthancProcess) -> list[Dataset]:
    found: list[dict[str, Any]] = orthanc.get_json("/instances?expand")  # type: ignore[assignment]
    segs: list[Dataset] = []
    for item in found:
        url = f"{orthanc.url}/instances/{item['ID']}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            ds = dcmread(io.BytesIO(response.read()))
        if ds.Modality == "SEG":
            segs.append(ds)
    return segs


def node_config(tmp_path: Path, orthanc: OrthancProcess, outside: OutsideService) -> Path:
    key_file = tmp_path / "node.key"
    write_key_file(key_file, [bytes(range(32))])
    config = tmp_path / "node.toml"
    config.write_text(
        f"""data_dir = {json.dumps(str(tmp_path / "data"))}
spool_encryption_key_file = {json.dumps(str(key_file))}
study_quiet_seconds = 1.0
executor = "inline"

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = {orthanc.dicom_port}
ae_title = "{orthanc.ae_title}"

[[destinations]]
name = "outside-ai"
host = "127.0.0.1"
port = {outside.port}
ae_title = "OUTSIDEAI"
deidentify = "basic"
deidentify_options = ["retain-longitudinal-dates"]
results_to = ["pacs"]

[[rules]]
name = "to-outside-ai"
match = {{ Modality = "CT" }}
pipeline = ["gaussian"]
destinations = ["outside-ai"]
"""
    )
    return config


def test_a_result_from_the_outside_service_reaches_orthanc_reidentified(tmp_path: Path) -> None:
    series = generate_series(num_slices=SLICES, rows=64, columns=64, uid_seed="deid-roundtrip")
    paths = series.write(tmp_path / "study")
    originals = []
    for path in paths:
        ds = dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        originals.append(ds)
    study_uid = originals[0].StudyInstanceUID
    series_uid = originals[0].SeriesInstanceUID
    source_uids = {ds.SOPInstanceUID for ds in originals}

    with (
        running_orthanc(tmp_path / "orthanc") as orthanc,
        OutsideService() as outside,
        running_node(tmp_path / "data", config=node_config(tmp_path, orthanc, outside)) as node,
    ):
        files, _ = scan_files(paths)
        report = send(files, "127.0.0.1", node.port, calling_ae="CT1", called_ae="DICOMNODE")
        assert report.sent == SLICES

        received = outside.wait_for(SLICES, timeout=90)
        for raw in outside.raw:
            for value in (*PATIENT.values(), "Jane", study_uid, series_uid):
                assert value.encode() not in raw
        assert {ds.StudyInstanceUID for ds in received} != {study_uid}
        assert all(ds.PatientIdentityRemoved == "YES" for ds in received)

        seg = make_seg(received)
        assert outside.send_back(seg, node.port) == 0

        deadline = time.monotonic() + 90
        segs: list[Dataset] = []
        while not segs and time.monotonic() < deadline:
            time.sleep(0.5)
            segs = orthanc_segs(orthanc)
        assert segs, node.log()[-3000:]

    (back,) = segs
    assert back.SOPInstanceUID == seg.SOPInstanceUID  # the result's own UID stays
    assert str(back.PatientName) == PATIENT["PatientName"]
    assert back.PatientID == PATIENT["PatientID"]
    assert back.PatientBirthDate == PATIENT["PatientBirthDate"]
    assert back.StudyInstanceUID == study_uid
    assert back.StudyDate == originals[0].StudyDate
    referenced = back.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == (
        source_uids
    )
    assert back.FrameOfReferenceUID == originals[0].FrameOfReferenceUID
    sources = {
        item.ReferencedSOPInstanceUID
        for frame in back.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for item in derivation.SourceImageSequence
    }
    assert sources <= source_uids
    assert "PatientIdentityRemoved" not in back
