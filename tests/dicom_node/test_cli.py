"""The command line as an admin uses it: exit codes, messages, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node import __version__
from dicom_node.cli import app
from dicom_node.node import Node
from dicom_node.synthetic import SyntheticSeries
from dicom_node.testing import free_port

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("port = 99999\n")
    result = runner.invoke(app, ["studies", "--config", str(config)])
    assert result.exit_code == 2
    assert "port" in result.output and "65535" in result.output


def test_invalid_environment_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_STUDY_QUIET_SECONDS", "soon")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 2 and "study_quiet_seconds" in result.output


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
    assert table.exit_code == 0 and small_ct.study_instance_uid[:20] in table.output


def test_send_reports_failures_with_nonzero_exit(node: Node, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    good = get_testdata_file("CT_small.dcm")
    refused = get_testdata_file("JPEGLSNearLossless_16.dcm")  # no Study Instance UID
    result = runner.invoke(
        app, ["send", str(good), str(refused), "--to", f"127.0.0.1:{node.settings.port}"]
    )
    assert result.exit_code == 1
    assert "sent 1 of 2" in result.output and "0xC000" in result.output


def test_send_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["send", str(empty), "--to", "127.0.0.1:104"])
    assert result.exit_code == 1 and "no DICOM instances" in result.output
    result = runner.invoke(app, ["send", str(tmp_path / "absent"), "--to", "127.0.0.1:104"])
    assert result.exit_code == 1 and "no such file" in result.output
    result = runner.invoke(app, ["send", str(empty), "--to", "nonsense"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_echo_success_and_unreachable(node: Node) -> None:
    ok = runner.invoke(app, ["echo", "127.0.0.1", str(node.settings.port)])
    assert ok.exit_code == 0 and "success" in ok.output
    down = runner.invoke(app, ["echo", "127.0.0.1", str(free_port()), "--timeout", "2"])
    assert down.exit_code == 1 and "no association" in down.output


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
