"""The command line as an admin uses it: exit codes, messages, JSON."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from dicom_node import __version__
from dicom_node.cli import app
from dicom_node.jobs.state import create_jobs
from dicom_node.node import Node
from dicom_node.storage import Spool
from dicom_node.synthetic import SyntheticSeries
from dicom_node.testing import free_port
from processors.errors import BadInputError
from tests.dicom_node import test_routing
from tests.dicom_node.jobs.test_state import CT_RULE, LATER
from tests.dicom_node.test_routing import add_series, settings_with, study_id
from tests.processors import test_gpu_backend
from tests.processors.test_gpu_backend import FakeCuda

if TYPE_CHECKING:
    from typer.testing import Result

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_db_upgrade_and_empty_studies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path))
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert (tmp_path / "dicom-node.db").exists()
    result = runner.invoke(app, ["studies", "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == []


def test_send_then_studies_json(
    node: Node, small_ct: SyntheticSeries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    small_ct.write(folder, suffix="")  # files without a .dcm name
    (folder / "README.txt").write_text("not dicom")
    result = runner.invoke(
        app, ["send", str(folder), "--to", f"127.0.0.1:{node.settings.port}", "--aec", "DICOMNODE"]
    )
    assert result.exit_code == 0, result.output
    assert f"sent {len(small_ct.datasets)} of {len(small_ct.datasets)}" in result.output
    assert "skipped" in result.output and "README.txt" in result.output
    assert node.indexer is not None and node.indexer.flush()

    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(node.settings.data_dir))
    rows = json.loads(runner.invoke(app, ["studies", "--json"]).output)
    assert [(r["study_instance_uid"], r["num_instances"], r["status"]) for r in rows] == [
        (small_ct.study_instance_uid, len(small_ct.datasets), "receiving")
    ]
    table = runner.invoke(app, ["studies"])
    assert table.exit_code == 0, table.output
    [row] = [
        line.split() for line in table.stdout.splitlines() if small_ct.study_instance_uid in line
    ]
    assert row[:3] == ["receiving", "1", str(len(small_ct.datasets))]
    assert row[-1] == small_ct.study_instance_uid  # whole, however long, when piped


def test_send_reports_failures_with_nonzero_exit(node: Node, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    good = get_testdata_file("CT_small.dcm")
    refused = get_testdata_file("JPEGLSNearLossless_16.dcm")  # no Study Instance UID
    result = runner.invoke(
        app, ["send", str(good), str(refused), "--to", f"127.0.0.1:{node.settings.port}"]
    )
    assert result.exit_code == 1
    assert "sent 1 of 2" in result.output and "0xC000" in result.output


def test_echo_success(node: Node) -> None:
    ok = runner.invoke(app, ["echo", "127.0.0.1", str(node.settings.port)])
    assert ok.exit_code == 0 and "success" in ok.output


def test_serve_refuses_a_rule_with_an_unknown_processor(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        '[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 4242\nae_title = "PACS"\n'
        '[[rules]]\nname = "ct-default"\nmatch = { Modality = "CT" }\n'
        'pipeline = ["gaussian", "no_such_step"]\ndestinations = ["pacs"]\n'
        '[[rules]]\nname = "ct-params"\nmatch = { Modality = "CT" }\n'
        'pipeline = ["gaussian"]\nparams = { gaussian = { sigma_mm = -1 } }\n'
        'destinations = ["pacs"]\n'
    )
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "ct-default" in result.output and "no_such_step" in result.output
    assert "ct-params" in result.output and "sigma_mm" in result.output
    assert not (tmp_path / "data").exists(), "refused before anything started"


def test_serve_refuses_a_2d_rule_naming_a_volume_only_processor_in_one_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        '[[rules]]\nname = "mg-model"\nmatch = { Modality = "MG" }\n'
        'pipeline = ["clahe", "unet"]\n'
    )
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert_refused(result, 2, "mg-model", "'unet' takes no 2-D images", "MG")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "data").exists(), "refused before anything started"


# -- every command's bad-argument path: one line on stderr, exit 2 (bad input) or 1 -----------


def assert_refused(result: Result, exit_code: int, *words: str) -> str:
    """The command stopped with ``exit_code`` and said why in its last stderr line, the one
    line that starts with ``error:``. An exception escaping the command (a traceback when
    run from a shell) is ``result.exception`` itself instead of the ``SystemExit``."""
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


@pytest.fixture
def without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's CuPy, if any, is out of sight: the CPU-only machine of a user."""
    from processors import backend

    reason = "CuPy is not importable: ModuleNotFoundError: No module named 'cupy'"
    monkeypatch.setattr(backend, "cupy_status", lambda: (False, reason))


@pytest.fixture
def series_folder(small_ct: SyntheticSeries, tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    small_ct.write(folder)
    return folder


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ("cuda:0", ("cuda:0", "CuPy is not importable")),
        ("cuda", ("cuda", "CuPy is not importable")),
        ("gpu", ("'gpu'", "auto, cpu or cuda:N")),
        ("cuda:x", ("'cuda:x'", "auto, cpu or cuda:N")),
    ],
)
@pytest.mark.usefixtures("without_cupy")
def test_process_refuses_a_device_it_cannot_use(
    series_folder: Path, tmp_path: Path, device: str, words: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    args = ["process", "-p", "gaussian", str(series_folder), "-o", str(out), "--device", device]
    assert_refused(runner.invoke(app, args), 2, *words)
    assert not any(out.rglob("*.dcm"))


fake_cupy = test_gpu_backend.fake_cupy  # a CuPy that sees two GPUs


def test_process_refuses_a_gpu_this_machine_does_not_have(
    fake_cupy: FakeCuda, series_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["process", "-p", "gaussian", str(series_folder), "-o", str(out), "--device"]
    message = assert_refused(runner.invoke(app, [*args, "cuda:2"]), 2, "--device", "cuda:2")
    assert "does not exist (2 CUDA device(s))" in message
    assert fake_cupy.events == []  # checked, nothing switched


def test_settings_are_checked_without_importing_an_array_library() -> None:
    check = (
        "import sys; from dicom_node.config import load_settings; "
        "load_settings(None, processing_device='cuda:1'); "
        "print(sorted({'numpy', 'cupy'} & set(sys.modules)))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("param", "words"),
    [
        ("k=2", ("'k=2'", "PROCESSOR.KEY=VALUE")),
        ("kmeans.k", ("'kmeans.k'", "PROCESSOR.KEY=VALUE")),
        ("kmeans.=2", ("PROCESSOR.KEY=VALUE",)),
        ("kmeans.k=0", ("kmeans", "invalid parameters", "greater than or equal to 2")),
        ("kmeans.k=two", ("kmeans", "invalid parameters", "integer")),
        ("kmeans.colour=1", ("kmeans", "colour")),
        ("gaussian.sigma_mm=2", ("gaussian", "not in the pipeline")),
    ],
)
def test_process_refuses_a_malformed_param(
    series_folder: Path, tmp_path: Path, param: str, words: tuple[str, ...]
) -> None:
    args = ["process", str(series_folder), "-p", "kmeans", "-o", str(tmp_path / "o")]
    assert_refused(runner.invoke(app, [*args, "--param", param]), 2, *words)


def test_process_refuses_unusable_paths_and_names(series_folder: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")

    def process(source: Path, output: Path, *more: str) -> Result:
        return runner.invoke(app, ["process", str(source), "-o", str(output), *more])

    assert_refused(process(tmp_path / "absent", tmp_path / "o", "-p", "kmeans"), 2, "absent")
    assert_refused(process(a_file, tmp_path / "o", "-p", "kmeans"), 2, "a-file")
    assert_refused(process(series_folder, a_file, "-p", "kmeans"), 2, "a-file")
    assert_refused(process(series_folder, tmp_path / "o", "-p", "sharpen"), 2, "'sharpen'")
    assert_refused(process(series_folder, tmp_path / "o", "-p", " , "), 2, "no processor")
    bad_root = process(series_folder, tmp_path / "o", "-p", "kmeans", "--uid-root", "1.02.x")
    assert_refused(bad_root, 2, "UID root")


def test_process_on_a_full_disk_is_one_line_and_exit_1(
    series_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import dicom_node.process

    def full_disk(_dataset: object, path: Path, _keys: object) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(dicom_node.process, "_write", full_disk)
    args = ["process", str(series_folder), "-p", "threshold_segment", "-o", str(tmp_path / "o")]
    assert_refused(runner.invoke(app, args), 1, "No space left on device", str(tmp_path / "o"))


def test_process_checks_the_pipeline_before_making_the_output_folder(
    series_folder: Path, tmp_path: Path
) -> None:
    base = ["process", str(series_folder), "-o", str(tmp_path / "new" / "out")]
    assert_refused(runner.invoke(app, [*base, "-p", "sharpen"]), 2, "'sharpen'")
    assert_refused(runner.invoke(app, [*base, "-p", "kmeans", "--param", "kmeans.k=0"]), 2, "k")
    assert not (tmp_path / "new").exists()


def test_generate_refuses_bad_arguments(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    small = ["--slices", "2", "--size", "16"]
    assert_refused(runner.invoke(app, ["generate", str(a_file), *small]), 2, "a-file")
    modality = runner.invoke(app, ["generate", str(tmp_path / "g"), "--modality", "XR", *small])
    assert_refused(modality, 2, "--modality", "CT or MR")
    assert_refused(runner.invoke(app, ["generate", str(tmp_path), "--slices", "0"]), 2, "--slices")


def test_send_refuses_bad_arguments(series_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    to = ["--to", "127.0.0.1:104"]
    assert_refused(runner.invoke(app, ["send", str(tmp_path / "absent"), *to]), 2, "absent")
    assert_refused(runner.invoke(app, ["send", str(empty), *to]), 2, "no DICOM instances")
    bad_to = runner.invoke(app, ["send", str(series_folder), "--to", "nonsense"])
    assert_refused(bad_to, 2, "--to", "HOST:PORT", "'nonsense'")
    long_title = runner.invoke(app, ["send", str(series_folder), *to, "--aet", "X" * 17])
    assert_refused(long_title, 2, "--aet", "16 characters")
    unreachable = ["--to", f"127.0.0.1:{free_port()}", "--timeout", "2"]
    assert_refused(runner.invoke(app, ["send", str(series_folder), *unreachable]), 1, "127.0.0.1")


def test_echo_refuses_bad_arguments() -> None:
    down = runner.invoke(app, ["echo", "127.0.0.1", str(free_port()), "--timeout", "2"])
    assert_refused(down, 1, "no association")
    assert_refused(runner.invoke(app, ["echo", "127.0.0.1", "eleven"]), 2, "'port'", "integer")
    assert_refused(runner.invoke(app, ["echo", "127.0.0.1", "104", "--aec", "X" * 17]), 2, "--aec")


def test_unknown_command_and_option() -> None:
    assert_refused(runner.invoke(app, ["fetch"]), 2, "fetch")
    assert_refused(runner.invoke(app, ["--bogus"]), 2, "--bogus")
    assert_refused(runner.invoke(app, ["jobs", "--bogus"]), 2, "--bogus")


def test_groups_without_a_subcommand_still_show_their_help() -> None:
    for command in ([], ["db"], ["plugins"]):
        result = runner.invoke(app, command)
        assert "Usage" in result.output and "error" not in result.output.lower(), command


@pytest.mark.parametrize(
    "command",
    [
        ["studies"],
        ["jobs"],
        ["jobs", "retry", "1"],
        ["exports"],
        ["exports", "retry", "1"],
        ["db", "upgrade"],
        ["plugins", "list"],
        ["plugins", "enable", "gaussian"],
        ["serve"],
    ],
)
@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("port = 99999", ("port", "65535")),
        ('processing_device = "gpu"', ("processing_device", "auto, cpu or cuda:N")),
        ("port = = 1", ("not valid TOML",)),
    ],
)
def test_every_command_refuses_a_bad_config(
    tmp_path: Path, command: list[str], toml: str, words: tuple[str, ...]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n{toml}\n')
    assert_refused(runner.invoke(app, [*command, "--config", str(config)]), 2, *words)
    assert not (tmp_path / "data").exists(), "refused before anything was created"


def test_a_missing_config_file_and_a_bad_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = runner.invoke(app, ["studies", "--config", str(tmp_path / "absent.toml")])
    assert_refused(absent, 2, "absent.toml")
    monkeypatch.setenv("DICOM_NODE_STUDY_QUIET_SECONDS", "soon")
    assert_refused(runner.invoke(app, ["db", "upgrade"]), 2, "study_quiet_seconds")
    monkeypatch.setenv("DICOM_NODE_STUDY_QUIET_SECONDS", "5")
    monkeypatch.setenv("DICOM_NODE_PROCESSING_DEVICE", "gpu")
    assert_refused(runner.invoke(app, ["db", "upgrade"]), 2, "processing_device")


@pytest.mark.usefixtures("without_cupy")
def test_serve_refuses_a_device_it_cannot_use_before_binding(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nport = {port}\nprocessing_device = "cuda:1"\n'
    )
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert_refused(result, 2, "processing_device", "cuda:1", "CuPy is not importable")
    assert not (tmp_path / "data").exists(), "refused before anything started"


@pytest.mark.usefixtures("without_cupy")
def test_serve_leaves_a_remote_clusters_device_to_its_workers() -> None:
    """With ``scheduler_address`` the jobs run on other machines: this one's CuPy does not
    matter."""
    from dicom_node.cli import refuse_unusable_device
    from dicom_node.config import load_settings

    remote = load_settings(
        None, processing_device="cuda", scheduler_address=f"tcp://127.0.0.1:{free_port()}"
    )
    refuse_unusable_device(remote)  # does not raise
    with pytest.raises(BadInputError, match="processing_device"):
        refuse_unusable_device(load_settings(None, processing_device="cuda"))


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """``serve`` configures logging onto the runner's stderr, which is gone after the test."""
    import structlog

    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


@pytest.mark.usefixtures("logging_restored")
def test_serve_reports_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from dicom_node import receiver_pool

    # open_listener waits 10 s for a port a crashed receiver may still hold; not here.
    monkeypatch.setattr(receiver_pool.open_listener, "__defaults__", (0.0,))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(
            f'data_dir = "{tmp_path / "data"}"\nhost = "127.0.0.1"\nport = {port}\n'
            'executor = "inline"\nreceiver_processes = 1\n'
        )
        result = runner.invoke(app, ["serve", "--config", str(config)])
    assert_refused(result, 1, "cannot start the node", "in use")


def test_missing_ids_and_names_are_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path))
    assert_refused(runner.invoke(app, ["jobs", "retry", "999"]), 2, "no job with id 999")
    assert_refused(runner.invoke(app, ["exports", "retry", "999"]), 2, "no export with id 999")
    assert_refused(runner.invoke(app, ["jobs", "--state", "bogus"]), 2, "'bogus'")
    unknown = runner.invoke(app, ["plugins", "show", "sharpen"])
    assert_refused(unknown, 2, "no plugin named 'sharpen'", "gaussian")


# A migrated SQLite database at tmp_path / "index.db", and a spool, as the routing tests use.
sessions = test_routing.sessions
spool = test_routing.spool


@pytest.fixture
def queued_job(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> int:
    """The id of a queued job in the database the commands use (``DICOM_NODE_DATABASE_URL``)."""
    add_series(spool, sessions, number=1)
    with sessions.begin() as session:
        [job] = create_jobs(session, settings_with(CT_RULE), study_id(sessions), LATER)
        job_id = job.id
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", f"sqlite:///{tmp_path / 'index.db'}")
    return job_id


def test_jobs_table_and_the_retry_of_a_queued_job(queued_job: int) -> None:
    table = runner.invoke(app, ["jobs"])
    assert table.exit_code == 0, table.output
    [row] = [line.split() for line in table.stdout.splitlines() if "gaussian" in line]
    assert row[0] == str(queued_job) and "queued" in row and "ct" in " ".join(row)
    queued = json.loads(runner.invoke(app, ["jobs", "--state", "queued", "--json"]).stdout)
    assert [job["id"] for job in queued] == [queued_job]
    assert "no failed jobs" in runner.invoke(app, ["jobs", "--state", "failed"]).stdout
    result = runner.invoke(app, ["jobs", "retry", str(queued_job)])
    assert_refused(result, 2, f"job {queued_job} is queued", "nothing to retry")
