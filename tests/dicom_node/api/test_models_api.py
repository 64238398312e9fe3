"""``/api/v1/models``: uploads checked field by field, registered disabled, enabled after
an evaluation (or by force), run by a rule's ``model:<name>`` step, audited."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.enums import JobState, TokenRole
from db.models import Job, Output
from dicom_node.api.testing import ApiHarness, api_harness, settings_for
from dicom_node.jobs.worker import run_job
from dicom_node.model_registry import models_dir, record_evaluation
from dicom_node.security.audit import Actor, AuditAction
from dicom_node.storage import Spool
from processors.model import UNET_MANIFEST
from tests.dicom_node.jobs.test_state import dispatch_once
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import PACS, add_series

UNET_FILE = UNET_MANIFEST.parent / "lung-lesion-unet.onnx"


def manifest(**changes: Any) -> dict[str, Any]:
    """The shipped U-Net's manifest as an upload of the model ``lungs``."""
    document: dict[str, Any] = json.loads(UNET_MANIFEST.read_text())
    del document["model"]
    return {**document, "name": "lungs", **changes}


def upload(
    api: ApiHarness,
    content: bytes | None = None,
    document: dict[str, Any] | None = None,
    role: TokenRole = TokenRole.ADMIN,
) -> Any:
    """POST the U-Net (or ``content``) with its manifest (or ``document``); with
    ``content`` but no ``document``, no manifest at all."""
    if document is None and content is None:
        document = manifest()
    return api.client.post(
        "/api/v1/models",
        headers=api.headers(role),
        files={"file": ("model.onnx", UNET_FILE.read_bytes() if content is None else content)},
        data={} if document is None else {"manifest": json.dumps(document)},
    )


def test_a_good_upload_is_stored_by_its_digest_and_registered_disabled(api: ApiHarness) -> None:
    response = upload(api)
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(UNET_FILE.read_bytes()).hexdigest()
    assert body["step"] == "model:lungs" and body["enabled_version"] is None
    [version] = body["versions"]
    assert version["file_sha256"] == digest and version["evaluation"] is None
    stored = models_dir(api.context.settings) / "sha256" / f"{digest}.onnx"
    assert stored.read_bytes() == UNET_FILE.read_bytes()
    assert version["manifest"]["model"] == f"../sha256/{digest}.onnx"
    assert not list((models_dir(api.context.settings) / "incoming").iterdir())

    viewer = api.client.get("/api/v1/models/lungs", headers=api.headers(TokenRole.VIEWER))
    assert viewer.status_code == 200 and viewer.json()["versions"] == [version]
    listed = api.client.get("/api/v1/models", headers=api.headers(TokenRole.VIEWER)).json()
    assert [(m["step"], m["versions"]) for m in listed] == [("model:lungs", ["1.2.0"])]
    [row] = audit_rows(api.context.sessions, AuditAction.MODEL_CHANGED)
    assert row["actor"] == "admin" and row["object_id"] == "lungs"
    assert row["details"]["change"] == "uploaded"

    again = upload(api)
    assert again.status_code == 409 and "registered already" in again.json()["detail"]


BAD_UPLOADS: list[tuple[bytes | None, dict[str, Any] | None, str]] = [
    (None, manifest(labels=[]), "manifest.labels"),
    (None, manifest(normalization={"type": "window", "lower": 5, "upper": 1}), "manifest."),
    (None, manifest(name="Lungs!"), "manifest.name"),
    (None, manifest(sha256="0" * 64), "manifest.sha256"),
    (None, manifest(input={"name": "pixels"}), "manifest.input.name"),
    (None, manifest(output={"name": "probabilities"}), "manifest.output.name"),
    (None, manifest(spatial_dims=2, patch_size=[96, 96]), "inputs[0].shape"),
    (b"not an onnx file", manifest(), "file: not an ONNX model"),
    (b"not an onnx file", None, "file: not a .skops model"),
]


def test_a_bad_upload_is_a_422_naming_the_field_and_registers_nothing(api: ApiHarness) -> None:
    for content, document, field in BAD_UPLOADS:
        response = upload(api, content, document)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(field), (field, response.text)
    assert api.client.get("/api/v1/models", headers=api.headers(TokenRole.ADMIN)).json() == []
    assert not list((models_dir(api.context.settings) / "incoming").iterdir())
    assert audit_rows(api.context.sessions, AuditAction.MODEL_CHANGED) == []


@pytest.mark.parametrize(
    "limit",
    [100_000, 1_000_000],
    ids=["refused-by-its-length", "refused-while-it-arrives"],
)
def test_an_upload_over_the_limit_is_a_413_and_leaves_no_file(tmp_path: Path, limit: int) -> None:
    with api_harness(settings_for(tmp_path, model_upload_max_bytes=limit)) as api:
        response = upload(api)
        assert response.status_code == 413, response.text
        assert "model_upload_max_bytes" in response.json()["detail"]
        folder = models_dir(api.context.settings)
        assert not [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else True


def test_only_an_admin_uploads(api: ApiHarness) -> None:
    assert upload(api, role=TokenRole.OPERATOR).status_code == 403


def test_enabling_needs_an_evaluation_or_force_and_one_version_runs(api: ApiHarness) -> None:
    admin = api.headers(TokenRole.ADMIN)
    assert upload(api).status_code == 201
    assert upload(api, document=manifest(version="1.3.0")).status_code == 201
    refused = api.client.post("/api/v1/models/lungs/enable", headers=admin)
    assert refused.status_code == 409 and "no evaluation" in refused.json()["detail"]

    with api.context.sessions.begin() as session:
        record_evaluation(session, "lungs", "1.2.0", {"task": "segmentation"}, Actor.os_user())
    enabled = api.client.post("/api/v1/models/lungs/enable?version=1.2.0", headers=admin)
    assert enabled.status_code == 200 and enabled.json()["enabled_version"] == "1.2.0"
    forced = api.client.post("/api/v1/models/lungs/enable?force=true", headers=admin)
    assert forced.json()["enabled_version"] == "1.3.0"
    versions = {v["version"]: v["enabled"] for v in forced.json()["versions"]}
    assert versions == {"1.2.0": False, "1.3.0": True}

    disabled = api.client.post("/api/v1/models/lungs/disable", headers=admin)
    assert disabled.json()["enabled_version"] is None
    missing = api.client.post("/api/v1/models/other/enable", headers=admin)
    assert missing.status_code == 404
    changes = [r["details"]["change"] for r in audit_rows(api.context.sessions)[-6:]]
    assert changes == ["uploaded", "uploaded", "evaluated", "enabled", "enabled", "disabled"]


def test_deleting_a_version_keeps_the_file_another_version_uses(api: ApiHarness) -> None:
    admin = api.headers(TokenRole.ADMIN)
    upload(api)
    upload(api, document=manifest(version="1.3.0"))
    blobs = models_dir(api.context.settings) / "sha256"
    one = api.client.delete("/api/v1/models/lungs?version=1.2.0", headers=admin)
    assert one.status_code == 200 and one.json()["files_removed"] == 1  # its manifest only
    assert len(list(blobs.iterdir())) == 1
    every = api.client.delete("/api/v1/models/lungs", headers=admin)
    assert every.status_code == 200 and every.json()["files_removed"] == 2
    assert list(blobs.iterdir()) == []
    assert api.client.get("/api/v1/models/lungs", headers=admin).status_code == 404


def test_a_rule_runs_the_uploaded_model_once_enabled(tmp_path: Path) -> None:
    rule = {"name": "lungs", "match": {"Modality": "CT"}, "pipeline": ["model:lungs"]}
    settings = settings_for(
        tmp_path, destinations=[PACS], rules=[{**rule, "destinations": ["pacs"]}]
    )
    with api_harness(settings) as api:
        assert upload(api).status_code == 201
        forced = api.client.post(
            "/api/v1/models/lungs/enable?force=true", headers=api.headers(TokenRole.ADMIN)
        )
        assert forced.status_code == 200
        sessions = api.context.sessions
        add_series(Spool(settings.spool_dir, fsync=False), sessions, number=1, num_slices=6)
        dispatch_once(sessions, settings, run_job)
        with sessions() as session:
            [job] = session.scalars(select(Job))
            outputs = list(session.scalars(select(Output)))
        assert job.state is JobState.SUCCEEDED, job.error
        assert {(o.processor_name, o.processor_version) for o in outputs} == {
            ("model:lungs", "1.2.0")
        }
        assert {o.kind for o in outputs} >= {"seg"}


def test_a_skops_classifier_is_uploaded_without_a_manifest(api: ApiHarness) -> None:
    content = (UNET_MANIFEST.parents[1] / "demo-lesion-presence.skops").read_bytes()
    response = upload(api, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["step"], body["kind"]) == ("model:demo-lesion-presence", "classification")
    assert body["versions"][0]["manifest"]["class_names"] == ["absent", "present"]
    digest = hashlib.sha256(content).hexdigest()
    assert (models_dir(api.context.settings) / "sha256" / f"{digest}.skops").is_file()


def test_a_rule_naming_an_uploaded_model_is_accepted_by_the_rules_api(api: ApiHarness) -> None:
    admin = api.headers(TokenRole.ADMIN)
    rule = {"name": "lungs-ct", "match": {"Modality": "CT"}, "pipeline": ["model:lungs"]}
    before = api.client.post("/api/v1/rules", headers=admin, json=rule)
    assert before.status_code == 422 and "model:lungs" in before.text
    assert upload(api).status_code == 201
    assert api.client.post("/api/v1/models/lungs/enable?force=true", headers=admin).is_success
    after = api.client.post("/api/v1/rules", headers=admin, json=rule)
    assert after.status_code == 201, after.text
    tried = api.client.post("/api/v1/rules/test", headers=admin, json={"rule": rule})
    assert tried.status_code == 200, tried.text
    assert not any("refused" in note for note in tried.json()["notes"]), tried.text
