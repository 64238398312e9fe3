"""``dicom-node models``: upload, evaluate, enable, list; refusals as one line and exit
code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicom_node.cli import app, check_rule_pipelines
from dicom_node.config import ConfigError, load_settings
from dicom_node.security.audit import AuditAction
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_cli import assert_refused
from tests.dicom_node.test_model_evaluation import MODELS, labelled_set

runner = CliRunner()
VOLUME_MODEL = MODELS / "demo-lesion-volume.skops"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DICOM_NODE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def listing() -> list[dict[str, object]]:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_upload_evaluate_then_enable(data_dir: Path, tmp_path: Path) -> None:
    uploaded = runner.invoke(app, ["models", "upload", str(VOLUME_MODEL)])
    assert uploaded.exit_code == 0, uploaded.output
    assert "registered model:demo-lesion-volume version 1.0.0" in uploaded.stdout
    assert [(m["step"], m["enabled_version"]) for m in listing()] == [
        ("model:demo-lesion-volume", None)
    ]
    refused = runner.invoke(app, ["models", "enable", "demo-lesion-volume"])
    assert_refused(refused, 2, "no evaluation", "models evaluate demo-lesion-volume")

    data, _cases = labelled_set(tmp_path, "volume")
    evaluated = runner.invoke(
        app, ["models", "evaluate", "demo-lesion-volume", "--data", str(data), "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    figures = json.loads(evaluated.stdout)
    assert figures["task"] == "regression" and figures["cases"] == 5
    assert listing()[0]["evaluated"] is True

    enabled = runner.invoke(app, ["models", "enable", "demo-lesion-volume"])
    assert enabled.exit_code == 0, enabled.output
    assert listing()[0]["enabled_version"] == "1.0.0"
    table = runner.invoke(app, ["models", "list"])
    assert "model:demo-lesion-volume" in table.stdout and "yes" in table.stdout
    changes = [
        row["details"]["change"]
        for row in audit_rows_of(data_dir)
        if row["action"] == AuditAction.MODEL_CHANGED
    ]
    assert changes == ["uploaded", "evaluated", "enabled"]


def audit_rows_of(data_dir: Path) -> list[dict[str, object]]:
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{data_dir / 'dicom-node.db'}")
    try:
        return audit_rows(make_sessionmaker(engine))
    finally:
        engine.dispose()


def test_refusals_are_one_line(data_dir: Path, tmp_path: Path) -> None:
    assert_refused(
        runner.invoke(app, ["models", "evaluate", "nothing", "--data", str(tmp_path)]),
        2,
        "no registered model named 'nothing'",
    )
    onnx = MODELS / "unet" / "lung-lesion-unet.onnx"
    assert_refused(runner.invoke(app, ["models", "upload", str(onnx)]), 2, "--manifest")
    assert_refused(
        runner.invoke(app, ["models", "upload", str(tmp_path / "absent.skops")]),
        2,
        "cannot read",
    )
    bad_manifest = tmp_path / "manifest.json"
    bad_manifest.write_text("{not json")
    assert_refused(
        runner.invoke(app, ["models", "upload", str(onnx), "--manifest", str(bad_manifest)]),
        2,
        "manifest: not JSON",
    )
    rule = {"name": "volume", "pipeline": ["model:demo-lesion-volume"]}
    settings = load_settings(None, data_dir=data_dir, rules=[rule])
    with pytest.raises(ConfigError, match="unknown processor 'model:demo-lesion-volume'"):
        check_rule_pipelines(settings)
    assert runner.invoke(app, ["models", "upload", str(VOLUME_MODEL)]).exit_code == 0
    check_rule_pipelines(settings)  # a rule may name it as soon as it is uploaded
    assert_refused(
        runner.invoke(
            app, ["models", "evaluate", "demo-lesion-volume", "--data", str(tmp_path / "no")]
        ),
        2,
        "not a folder",
    )
    assert_refused(runner.invoke(app, ["models", "upload", str(VOLUME_MODEL)]), 2, "already")
