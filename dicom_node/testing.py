"""Real peer processes on loopback for tests, benchmarks and the demo: the node itself,
DCMTK ``storescp``/``storescu``/``echoscu``, and Orthanc. Ports are free ones, data goes
to the caller's temporary directory, and every process is stopped by its context manager.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from processors.errors import OperationFailedError

if TYPE_CHECKING:
    from dicom_node.config import Settings

DCMTK_ENV = {"TCP_NODELAY": "1"}  # without it Nagle's algorithm slows DCMTK tools tenfold


class ToolMissingError(OperationFailedError):
    """A required external program is not installed."""


def require_tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        raise ToolMissingError(
            f"{name} is not installed; run `make deps` (apt-get install dcmtk orthanc dicom3tools)"
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, **DCMTK_ENV}


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    ae_title: str
    log_path: Path
    env: dict[str, str]

    @property
    def database_url(self) -> str:
        return (
            self.env.get("DICOM_NODE_DATABASE_URL")
            or f"sqlite:///{self.data_dir / 'dicom-node.db'}"
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        return stop_process(self.process)


def node_env(data_dir: Path, port: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DICOM_NODE_")}
    env.update(
        {
            "DICOM_NODE_DATA_DIR": str(data_dir),
            "DICOM_NODE_PORT": str(port),
            "DICOM_NODE_HOST": "127.0.0.1",
            "DICOM_NODE_LOG_FORMAT": "json",
            "DICOM_NODE_HTTP_PORT": "0",  # tests that want the API give it a free port
        }
    )
    env.update(extra or {})
    return env


def start_node(
    data_dir: Path,
    *,
    port: int | None = None,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> NodeProcess:
    """Start ``dicom-node serve`` as a subprocess and wait until it logs that it listens
    (so keep ``log_level`` at INFO or lower)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    full_env = node_env(data_dir, port, env)
    log_path = data_dir.parent / f"node-{port}.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    command = [sys.executable, "-m", "dicom_node.cli", "serve"]
    if config is not None:
        command += ["--config", str(config)]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, cwd=data_dir.parent
        )
    node = NodeProcess(
        process,
        port,
        data_dir,
        full_env.get("DICOM_NODE_AE_TITLE", "DICOMNODE"),
        log_path,
        full_env,
    )
    deadline = time.monotonic() + timeout
    while "node listening" not in node.log()[log_offset:]:
        if process.poll() is not None or time.monotonic() > deadline:
            node.kill()
            raise RuntimeError(f"node did not start:\n{node.log()[log_offset:]}")
        time.sleep(0.05)
    # With DICOM_NODE_PORT=0 it listens on its TLS port only.
    listening = int(full_env["DICOM_NODE_PORT"]) or int(full_env["DICOM_NODE_TLS_PORT"])
    wait_for_port(listening, timeout, process)
    return node


@contextlib.contextmanager
def running_node(data_dir: Path, **kwargs: object) -> Iterator[NodeProcess]:
    node = start_node(data_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        if node.process.poll() is None:
            node.stop()


@contextlib.contextmanager
def storescp_process(
    output_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """DCMTK's reference SCP writing every received file under ``output_dir``: its port
    and its process. ``extra_args`` go to storescp (``+uf``: a file per instance received,
    so an instance received twice is two files)."""
    port = port or free_port()
    output_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [require_tool("storescp"), "-od", str(output_dir), "--accept-all", *extra_args, str(port)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 10, process)
        yield port, process
    finally:
        stop_process(process)


@contextlib.contextmanager
def running_storescp(
    output_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()
) -> Iterator[int]:
    """DCMTK's reference SCP, writing every received file under ``output_dir``."""
    with storescp_process(output_dir, port, extra_args) as (listening_port, _):
        yield listening_port


@dataclass
class OrthancProcess:
    dicom_port: int
    http_port: int
    ae_title: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get_json(self, path: str) -> object:
        import urllib.request

        # Only ever our own loopback Orthanc over http.
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:  # noqa: S310
            return json.loads(response.read())


ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _orthanc_dicomweb_plugin() -> str:
    if not ORTHANC_DICOMWEB_PLUGIN.exists():
        raise ToolMissingError(
            f"{ORTHANC_DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb (make deps)"
        )
    return str(ORTHANC_DICOMWEB_PLUGIN)


def orthanc_command(
    work_dir: Path,
    ae_title: str,
    dicom_port: int,
    http_port: int,
    *,
    dicomweb: bool = False,
    extra_config: Mapping[str, object] | None = None,
) -> list[str]:
    """Write a private Orthanc's configuration under ``work_dir`` (its own storage and
    index, Orthanc's defaults otherwise: ``SyncStorageArea`` stays true, each file is
    fsync'd; ``extra_config`` adds or overrides options, e.g. its DICOM TLS settings) and
    return the command that starts it. Run it with ``dcmtk_env()``."""
    binary = require_tool("Orthanc")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "dicom-node-test",
        "StorageDirectory": str(work_dir / "storage"),
        "IndexDirectory": str(work_dir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [_orthanc_dicomweb_plugin()] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        "DicomModalities": {},
        "UnknownSopClassAccepted": True,
        "StorageCompression": False,
        **(extra_config or {}),
    }
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    return [binary, str(config_path)]


@contextlib.contextmanager
def running_orthanc(
    work_dir: Path,
    ae_title: str = "ORTHANC",
    *,
    dicom_port: int | None = None,
    http_port: int | None = None,
    dicomweb: bool = False,
    extra_config: Mapping[str, object] | None = None,
) -> Iterator[OrthancProcess]:
    """A private Orthanc (Debian package) with its own storage, index and free ports.

    Orthanc's DICOM server is DCMTK: it runs with ``TCP_NODELAY=1`` like every DCMTK tool
    here. Start it again with the same ``work_dir`` and the ports of the first one to get
    the same PACS back (same storage and index), as after a restart.
    """
    dicom_port, http_port = dicom_port or free_port(), http_port or free_port()
    command = orthanc_command(
        work_dir, ae_title, dicom_port, http_port, dicomweb=dicomweb, extra_config=extra_config
    )
    log_path = work_dir / "orthanc.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, env=dcmtk_env(), stdout=log_file, stderr=subprocess.STDOUT, cwd=work_dir
        )
    try:
        wait_for_port(http_port, 60, process)
        wait_for_port(dicom_port, 60, process)
        yield OrthancProcess(dicom_port, http_port, ae_title, process)
    finally:
        stop_process(process)


CT_DEFAULT_PIPELINE = ("gaussian", "threshold_segment", "kmeans", "features")


def ct_default_config(orthanc: OrthancProcess, data_dir: Path, **settings: object) -> str:
    """A node.toml: the issue's ``ct-default`` rule sending every CT's outputs to
    ``orthanc`` (destination "pacs"), the node's data in ``data_dir``, more ``settings``."""
    lines = [f"data_dir = {json.dumps(str(data_dir))}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return (
        "\n".join(lines)
        + f"""

[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = {orthanc.dicom_port}
ae_title = "{orthanc.ae_title}"

[[rules]]
name = "ct-default"
match = {{ Modality = "CT" }}
pipeline = {json.dumps(list(CT_DEFAULT_PIPELINE))}
destinations = ["pacs"]
"""
    )


def storescu(
    files: list[Path] | list[str],
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "STORESCU",
    extra_args: list[str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("storescu"),
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *(extra_args or []),
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def echoscu(
    port: int,
    *,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "ECHOSCU",
    extra_args: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("echoscu"),
            *("-aet", calling_ae, "-aec", called_ae),
            *(extra_args or []),
            *("127.0.0.1", str(port)),
        ],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def local_settings(root: Path, **overrides: object) -> Settings:
    """Settings for a node under ``root`` on a free loopback port, quick to start and stop."""
    from dicom_node.config import load_settings

    values: dict[str, object] = {
        "data_dir": root / "data",
        "host": "127.0.0.1",
        "port": free_port(),
        "receiver_processes": 1,
        "study_quiet_seconds": 3600,
        "index_flush_seconds": 0.02,
        "shutdown_grace_seconds": 5,
        "executor": "inline",
        "http_port": 0,
    }
    values.update(overrides)
    return load_settings(None, **values)
