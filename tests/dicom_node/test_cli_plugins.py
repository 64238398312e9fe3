"""``dicom-node plugins ...`` against a real SQLite database chosen by the settings file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app
from tests.processors.test_registry import BUILTINS  # one list of the built-ins

runner = CliRunner()


@pytest.fixture
def config(tmp_path, monkeypatch):
    for key in ("DICOM_NODE_DATABASE_URL", "DICOM_NODE_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    path = tmp_path / "node.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    return path


def invoke(*args: str):
    return runner.invoke(app, ["plugins", *args])


def listing(config) -> dict[str, dict]:
    result = invoke("list", "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    return {p["name"]: p for p in json.loads(result.output)}


def test_list_json_shows_every_builtin_available(config, tmp_path):
    plugins = listing(config)
    assert set(plugins) >= BUILTINS
    for name in BUILTINS:
        entry = plugins[name]
        assert {"name", "version", "family", "available", "reason", "enabled"} <= set(entry)
        assert entry["available"] is True and entry["enabled"] is True
    assert (tmp_path / "data" / "dicom-node.db").exists()


def test_list_table(config):
    invoke("disable", "nlm", "--config", str(config))
    result = invoke("list", "--config", str(config))
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["NAME"][:6] == ["NAME", "VERSION", "FAMILY", "TAKES", "AVAILABLE", "ENABLED"]
    assert rows["threshold_segment"][2:6] == ["segment", "3-D/2-D/slide:grey", "yes", "yes"]
    assert rows["nlm"][2:6] == ["denoise", "3-D/2-D/slide:grey", "yes", "no"]
    assert rows["kmeans"][3] == "3-D/2-D/slide:grey+colour" and rows["unet"][3] == "3-D:grey"
    assert rows["histeq"][3] == "3-D/2-D:grey"  # a global mapping: no tiled form


def test_disable_enable_persist(config):
    result = invoke("disable", "nlm", "--config", str(config))
    assert result.exit_code == 0 and "disabled nlm" in result.output
    assert listing(config)["nlm"]["enabled"] is False
    assert listing(config)["mean"]["enabled"] is True
    result = invoke("enable", "nlm", "--config", str(config))
    assert result.exit_code == 0
    assert listing(config)["nlm"]["enabled"] is True


def test_pin_and_unpin(config):
    result = invoke("pin", "mean", "0.1.0", "--config", str(config))
    assert result.exit_code == 0 and "now unavailable" in result.output
    entry = listing(config)["mean"]
    assert entry["available"] is False and "pinned to version 0.1.0" in entry["reason"]
    assert invoke("unpin", "mean", "--config", str(config)).exit_code == 0
    assert listing(config)["mean"]["available"] is True


def test_show_prints_params_schema(config):
    result = invoke("show", "gaussian", "--config", str(config))
    assert result.exit_code == 0
    document = json.loads(result.output)
    assert document["family"] == "denoise"
    sigma = document["params_schema"]["properties"]["sigma_mm"]
    assert sigma["exclusiveMinimum"] == 0 and sigma["default"] == 1.0


def test_unknown_name(config):
    result = invoke("enable", "sharpen", "--config", str(config))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no plugin named 'sharpen' (known: ")
    assert result.stderr.count("\n") == 1 and "gaussian" in result.stderr


def test_bad_config_is_reported(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("port = 0\n", encoding="utf-8")
    result = invoke("list", "--config", str(path))
    assert result.exit_code == 2
    assert "port" in result.output


def test_database_url_from_environment(config, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("DICOM_NODE_DATABASE_URL", url)
    assert invoke("disable", "median", "--config", str(config)).exit_code == 0
    assert (tmp_path / "elsewhere.db").exists()
    assert not (tmp_path / "data" / "dicom-node.db").exists()
