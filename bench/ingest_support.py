"""Helpers of ``bench/ingest.py``: fresh copies of a series, a large multi-frame instance,
the memory of a process tree sampled from /proc, and the time until a peer accepts an
association.

Every copy of a series has the same bytes as the template except its study, series and
instance UIDs, which have the template's length: every receiver gets the same pixels and
the same file sizes, and never a UID it has seen (Orthanc answers a duplicate without
storing it, so reused UIDs flatter it).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

from dicom_node.testing import echoscu, stop_process

UID_DIGITS = 39


def fixed_length_uid() -> str:
    """A new 2.25 UID (from a random UUID), always 44 characters long."""
    return f"2.25.{10 ** (UID_DIGITS - 1) + uuid.uuid4().int % (9 * 10 ** (UID_DIGITS - 1))}"


@dataclass(frozen=True)
class TemplateFile:
    """One encoded file of the template series and the UIDs a copy replaces in its header."""

    data: bytes
    header_length: int  # bytes before the Pixel Data value; UIDs are only replaced there
    study_uid: str
    series_uid: str
    instance_uid: str


@dataclass(frozen=True)
class SeriesTemplate:
    files: tuple[TemplateFile, ...]

    @classmethod
    def from_datasets(cls, datasets: Sequence[Dataset]) -> SeriesTemplate:
        """Encode ``datasets`` (one series) with fixed-length UIDs, ready to be copied."""
        study_uid, series_uid = fixed_length_uid(), fixed_length_uid()
        files = []
        for dataset in datasets:
            instance_uid = fixed_length_uid()
            dataset.StudyInstanceUID = study_uid
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = instance_uid
            dataset.file_meta.MediaStorageSOPInstanceUID = UID(instance_uid)
            buffer = io.BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            data = buffer.getvalue()
            header_length = len(data) - len(dataset.PixelData)
            files.append(TemplateFile(data, header_length, study_uid, series_uid, instance_uid))
        return cls(tuple(files))

    @property
    def size_bytes(self) -> int:
        return sum(len(file.data) for file in self.files)

    def write_copy(self, directory: Path, count: int | None = None) -> list[Path]:
        """The first ``count`` files (all by default) under new study, series and instance
        UIDs, written to ``directory``."""
        directory.mkdir(parents=True)
        study_uid, series_uid = fixed_length_uid(), fixed_length_uid()
        paths = []
        for number, template in enumerate(self.files[:count]):
            replacements = {
                template.study_uid: study_uid,
                template.series_uid: series_uid,
                template.instance_uid: fixed_length_uid(),
            }
            header = template.data[: template.header_length].decode("latin-1")
            for old, new in replacements.items():
                if old not in header:
                    raise ValueError(f"UID {old} not found in the header of file {number}")
                header = header.replace(old, new)
            path = directory / f"{number:04d}.dcm"
            path.write_bytes(header.encode("latin-1") + template.data[template.header_length :])
            paths.append(path)
        return paths


def multiframe_dataset(frames: int, rows: int, columns: int) -> Dataset:
    """A Multi-frame Grayscale Word Secondary Capture instance without its Pixel Data."""
    ds = Dataset()
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = fixed_length_uid()
    ds.PatientName = "Bench^Multiframe"
    ds.PatientID = "BENCH-MF"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = fixed_length_uid()
    ds.StudyDate = "20260115"
    ds.StudyTime = "093000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.SeriesInstanceUID = fixed_length_uid()
    ds.SeriesNumber = 1
    ds.Laterality = ""
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_multiframe(path: Path, source: npt.NDArray[np.uint16], frames: int) -> Dataset:
    """Write a ``frames``-frame instance whose frames cycle through ``source`` (frames of
    uint16 pixels, 12 bits used), streaming the pixels so that they are never all in
    memory. Returns the dataset without its Pixel Data (its UIDs name the instance)."""
    dataset = multiframe_dataset(frames, source.shape[1], source.shape[2])
    frame_bytes = source[0].nbytes
    length = frames * frame_bytes
    if length >= 0xFFFFFFFE:
        raise ValueError(f"{frames} frames of {frame_bytes} bytes do not fit one element")
    with path.open("wb") as stream:
        dcmwrite(stream, dataset, enforce_file_format=True)
        stream.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for index in range(frames):
            stream.write(source[index % len(source)].astype("<u2").tobytes())
    return dataset


def frames_for_megabytes(megabytes: float, rows: int, columns: int) -> int:
    return max(1, round(megabytes * 1e6 / (rows * columns * 2)))


# --- memory of a process tree ------------------------------------------------------------

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc/PID/task/TID/children)."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    pending += [int(child) for child in _read(pid, f"task/{task}/children").split()]
    return found


def _read(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as stream:
        return stream.read()


def rss_bytes(pid: int) -> int:
    try:
        return int(_read(pid, "statm").split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0  # the process has exited


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in _read(pid, "status").splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_high_water_mark(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as stream:
            stream.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


@dataclass
class MemoryGrowth:
    before_bytes: int
    peak_bytes: int  # largest sampled sum of RSS over the tree
    samples: int
    high_water_growth_bytes: int | None  # sum of per-process VmHWM growth; None: unavailable
    processes: set[int] = field(default_factory=set)

    @property
    def sampled_growth_bytes(self) -> int:
        return self.peak_bytes - self.before_bytes

    @property
    def growth_bytes(self) -> int:
        """The larger of the two measurements."""
        return max(self.sampled_growth_bytes, self.high_water_growth_bytes or 0)


@contextlib.contextmanager
def sampled_memory(root: int, interval: float = 0.01) -> Iterator[MemoryGrowth]:
    """Sum the RSS of ``root`` and its descendants every ``interval`` seconds while the
    block runs (the tree is re-read every 20 samples, so processes started meanwhile
    count); per-process high-water marks are reset at the start and read at the end as a
    cross-check for peaks shorter than the interval."""
    pids = process_tree(root)
    before = {pid: rss_bytes(pid) for pid in pids}
    high_water_reset = all(_reset_high_water_mark(pid) for pid in pids)
    result = MemoryGrowth(sum(before.values()), sum(before.values()), 0, None, set(pids))
    stop = threading.Event()

    def sample() -> None:
        nonlocal pids
        while not stop.is_set():
            if result.samples % 20 == 0:
                pids = process_tree(root)
                result.processes.update(pids)
            result.peak_bytes = max(result.peak_bytes, sum(rss_bytes(pid) for pid in pids))
            result.samples += 1
            stop.wait(interval)

    sampler = threading.Thread(target=sample, name="memory-sampler", daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        if high_water_reset:
            result.high_water_growth_bytes = sum(
                max(0, _status_kb(pid, "VmHWM") - before.get(pid, 0)) for pid in process_tree(root)
            )


@contextlib.contextmanager
def frozen(roots: Sequence[int]) -> Iterator[None]:
    """Stop (SIGSTOP) the process trees of ``roots`` while the block runs, then let them
    continue: an idle receiver's timers and polling must not slow the one measured."""
    pids = [pid for root in roots for pid in process_tree(root)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --- cold start --------------------------------------------------------------------------


def time_to_first_association(
    command: Sequence[str],
    env: Mapping[str, str],
    port: int,
    *,
    called_ae: str,
    cwd: Path,
    log_path: Path,
    timeout: float = 120.0,
    poll_interval: float = 0.02,
) -> float:
    """Start ``command`` and return the seconds until a C-ECHO association to ``port``
    succeeds (connect attempts every ``poll_interval`` s, then DCMTK echoscu); the
    process is stopped before returning."""
    start = time.perf_counter()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        while time.perf_counter() - start < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {process.returncode}; see {log_path}")
            if _port_open(port) and echoscu(port, called_ae=called_ae).returncode == 0:
                return time.perf_counter() - start
            time.sleep(poll_interval)
        raise TimeoutError(f"no association accepted on port {port} within {timeout} s")
    finally:
        stop_process(process, timeout=30)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0
