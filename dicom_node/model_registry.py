"""Models registered by admins: their files on the shared storage, their rows in the
database (``registered_models``), and what a job needs to run one.

Storage: ``<data_dir>/models/`` (the data folder that nodes sharing one database share):

- ``sha256/<sha256>.onnx`` or ``.skops``: the uploaded file, named by its SHA-256, never
  rewritten; a version's file cannot change under a running job, and two versions with
  the same bytes share one file;
- ``manifests/<sha256>.json``: an ONNX model's manifest as registered (``model`` points at
  its file, ``sha256`` is the file's, so ``processors.model`` checks the bytes on load),
  named by its own SHA-256 and written again from the database row if it is missing;
- ``incoming/``: uploads being received, renamed into ``sha256/`` once checked.

A model is known to every node by its row (name, version unique): a rule's step
``model:<name>`` runs the name's enabled version, at most one per name. A new version is
registered disabled; enabling one needs an evaluation (``dicom-node models evaluate``)
unless forced, and disables the name's other versions. Every change is audited as
``model_changed`` in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.enums import ModelKind
from db.models import RegisteredModel, as_utc
from dicom_node.config import Settings
from dicom_node.security import audit
from processors.errors import BadInputError
from processors.model_manifest import Manifest
from processors.model_plugin import ModelRef, is_model_step, model_plugin_info, step_name
from processors.model_upload import UploadRefusedError, check_onnx, check_skops, parse_manifest
from processors.registry import PluginInfo

CHUNK = 1024 * 1024


class ModelRegistryError(BadInputError):
    """A request about registered models that cannot be done; the message says why."""


class UnknownModelError(ModelRegistryError):
    """No registered model (or version) of that name."""


class ModelConflictError(ModelRegistryError):
    """The request conflicts with what is registered (a version exists, no evaluation)."""


class UploadTooLargeError(ModelRegistryError):
    """The upload is larger than ``model_upload_max_bytes``."""


def models_dir(settings: Settings) -> Path:
    return settings.data_dir / "models"


def _suffix(kind: ModelKind) -> str:
    return ".onnx" if kind is ModelKind.SEGMENTATION else ".skops"


def blob_path(settings: Settings, sha256: str, kind: ModelKind) -> Path:
    return models_dir(settings) / "sha256" / f"{sha256}{_suffix(kind)}"


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, indent=2).encode()


def manifest_path(settings: Settings, row: RegisteredModel) -> Path:
    """The row's manifest file (written now if it is missing: it is derived data)."""
    content = _canonical(row.manifest)
    path = models_dir(settings) / "manifests" / f"{hashlib.sha256(content).hexdigest()}.json"
    if not path.is_file():
        _write_atomically(path, content)
    return path


def _write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


# --- Receiving an upload ------------------------------------------------------------------


@dataclass(frozen=True)
class StagedFile:
    """An upload written to ``models/incoming/``, with its digest and size."""

    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def stage_upload(source: BinaryIO, settings: Settings) -> StagedFile:
    """Copy ``source`` to ``models/incoming/`` in chunks, hashing it; more than
    ``model_upload_max_bytes`` raises ``UploadTooLargeError`` and keeps nothing."""
    limit = settings.model_upload_max_bytes
    folder = models_dir(settings) / "incoming"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}.part"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "wb") as handle:
            while chunk := source.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise UploadTooLargeError(
                        f"file: larger than model_upload_max_bytes ({limit} bytes)"
                    )
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return StagedFile(path, digest.hexdigest(), size)


def register_upload(
    session: Session,
    settings: Settings,
    staged: StagedFile,
    manifest_text: str | bytes | None,
    actor: audit.Actor,
) -> RegisteredModel:
    """Check the staged upload (an ONNX network with ``manifest_text``, or a ``.skops``
    classifier or regressor without one) and register it, disabled. The staged file is
    moved into the store or discarded; the caller commits."""
    try:
        if manifest_text is not None:
            manifest = parse_manifest(manifest_text)
            _refuse_existing(session, manifest.name, manifest.version)
            check_onnx(staged.path, manifest, staged.sha256)
            kind = ModelKind.SEGMENTATION
            name, version = manifest.name, manifest.version
            document = _stored_manifest(manifest, staged.sha256)
        else:
            loaded = check_skops(staged.path)
            name, version = loaded.name, loaded.version or "0"
            _refuse_existing(session, name, version)
            kind = ModelKind(loaded.task)
            document = {
                "format": "dicom-node-model/1",
                "name": name,
                "version": version,
                "task": loaded.task,
                "target": loaded.target,
                "feature_names": list(loaded.feature_names),
                "class_names": [str(c) for c in loaded.pipeline.classes_]
                if loaded.task == "classification"
                else [],
                "positive_class": loaded.positive_class,
                "sha256": staged.sha256,
            }
        target = blob_path(settings, staged.sha256, kind)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file():
            staged.discard()  # the same bytes are stored already
        else:
            staged.path.replace(target)
    except BaseException:
        staged.discard()
        raise
    row = RegisteredModel(
        name=name,
        version=version,
        kind=kind,
        file_sha256=staged.sha256,
        file_size=staged.size,
        manifest=document,
        enabled=False,
        uploaded_at=dt.datetime.now(dt.UTC),
        uploaded_by=f"{actor.kind}:{actor.name}",
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another admin or node registered it meanwhile
        raise ModelConflictError(
            f"model {name!r} version {version!r} is registered already"
        ) from None
    if kind is ModelKind.SEGMENTATION:
        manifest_path(settings, row)
    details = {"change": "uploaded", "version": version, "sha256": staged.sha256}
    _audit(session, actor, name, details)
    return row


def _stored_manifest(manifest: Manifest, sha256: str) -> dict[str, Any]:
    document = manifest.model_dump(mode="json")
    document["model"] = f"../sha256/{sha256}.onnx"
    document["sha256"] = sha256
    return document


def _refuse_existing(session: Session, name: str, version: str) -> None:
    if session.scalars(
        select(RegisteredModel.id).where(
            RegisteredModel.name == name, RegisteredModel.version == version
        )
    ).first():
        raise ModelConflictError(f"model {name!r} version {version!r} is registered already")


# --- Reading ------------------------------------------------------------------------------


def _rows(session: Session, name: str | None = None) -> list[RegisteredModel]:
    query = select(RegisteredModel).order_by(
        RegisteredModel.name, RegisteredModel.uploaded_at, RegisteredModel.id
    )
    if name is not None:
        query = query.where(RegisteredModel.name == name)
    return list(session.scalars(query))


def _versions_of(session: Session, name: str) -> list[RegisteredModel]:
    rows = _rows(session, name)
    if not rows:
        raise UnknownModelError(f"no registered model named {name!r}")
    return rows


def version_dict(row: RegisteredModel) -> dict[str, Any]:
    return {
        "version": row.version,
        "kind": str(row.kind),
        "enabled": row.enabled,
        "file_sha256": row.file_sha256,
        "file_size": row.file_size,
        "uploaded_at": as_utc(row.uploaded_at).isoformat(),
        "uploaded_by": row.uploaded_by,
        "evaluated_at": as_utc(row.evaluated_at).isoformat() if row.evaluated_at else None,
        "evaluation": row.evaluation,
        "manifest": row.manifest,
    }


def model_dict(rows: Sequence[RegisteredModel], *, details: bool) -> dict[str, Any]:
    """One model (all its versions, oldest first): its step name, its enabled version."""
    enabled = [row.version for row in rows if row.enabled]
    latest = rows[-1]
    summary: dict[str, Any] = {
        "name": latest.name,
        "step": step_name(latest.name),
        "kind": str(latest.kind),
        "enabled_version": enabled[0] if enabled else None,
        "latest_version": latest.version,
        "evaluated": latest.evaluation is not None,
    }
    if details:
        summary["versions"] = [version_dict(row) for row in rows]
    else:
        summary["versions"] = [row.version for row in rows]
    return summary


def list_models(session: Session) -> list[dict[str, Any]]:
    grouped: dict[str, list[RegisteredModel]] = {}
    for row in _rows(session):
        grouped.setdefault(row.name, []).append(row)
    return [model_dict(rows, details=False) for rows in grouped.values()]


def get_model(session: Session, name: str) -> dict[str, Any]:
    return model_dict(_versions_of(session, name), details=True)


def get_version(session: Session, name: str, version: str | None = None) -> RegisteredModel:
    """The version asked for, or the latest uploaded one."""
    rows = _versions_of(session, name)
    if version is None:
        return rows[-1]
    for row in rows:
        if row.version == version:
            return row
    raise UnknownModelError(
        f"model {name!r} has no version {version!r} (it has {[r.version for r in rows]})"
    )


# --- Changing -------------------------------------------------------------------------------


def _audit(session: Session, actor: audit.Actor, name: str, details: dict[str, Any]) -> None:
    audit.record(
        session,
        action=audit.AuditAction.MODEL_CHANGED,
        actor=actor,
        object_kind=audit.AuditObjectKind.MODEL,
        object_id=name,
        details=details,
    )


def enable(
    session: Session,
    name: str,
    actor: audit.Actor,
    *,
    version: str | None = None,
    force: bool = False,
) -> RegisteredModel:
    """Make ``version`` (default: the latest) the one ``model:<name>`` runs. A version
    without an evaluation is refused unless ``force``."""
    row = get_version(session, name, version)
    if row.evaluation is None and not force:
        raise ModelConflictError(
            f"model {name!r} version {row.version!r} has no evaluation: run "
            f"`dicom-node models evaluate {name} --data DIR` first, or enable with force"
        )
    for other in _rows(session, name):
        other.enabled = other.id == row.id
    _audit(
        session,
        actor,
        name,
        {"change": "enabled", "version": row.version, "forced": force and row.evaluation is None},
    )
    return row


def disable(session: Session, name: str, actor: audit.Actor) -> None:
    """No version of ``name`` runs: jobs naming it fail with the reason."""
    for row in _versions_of(session, name):
        row.enabled = False
    _audit(session, actor, name, {"change": "disabled"})


def remove(session: Session, name: str, actor: audit.Actor, *, version: str | None = None) -> None:
    """Delete every version of ``name`` (or one). The files go with ``collect_garbage``
    after the commit, when no other version uses them."""
    rows = [get_version(session, name, version)] if version else _versions_of(session, name)
    session.execute(delete(RegisteredModel).where(RegisteredModel.id.in_([r.id for r in rows])))
    _audit(session, actor, name, {"change": "deleted", "versions": [r.version for r in rows]})


def collect_garbage(session: Session, settings: Settings) -> list[Path]:
    """Remove the stored files no registered version uses; the removed paths."""
    used = {blob_path(settings, row.file_sha256, row.kind) for row in _rows(session)}
    used |= {manifest_path(settings, row) for row in _rows(session) if row.kind == "segmentation"}
    removed = []
    for folder in ("sha256", "manifests"):
        for path in sorted((models_dir(settings) / folder).glob("*")):
            if path.is_file() and path not in used and not path.name.startswith("."):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def record_evaluation(
    session: Session,
    name: str,
    version: str,
    evaluation: dict[str, Any],
    actor: audit.Actor,
) -> RegisteredModel:
    row = get_version(session, name, version)
    row.evaluation = evaluation
    row.evaluated_at = dt.datetime.now(dt.UTC)
    _audit(session, actor, name, {"change": "evaluated", "version": version})
    return row


# --- What rules and jobs see ------------------------------------------------------------------


def version_ref(settings: Settings, row: RegisteredModel) -> ModelRef:
    """What a job (or an evaluation) needs to run this version."""
    path = (
        manifest_path(settings, row)
        if row.kind == "segmentation"
        else blob_path(settings, row.file_sha256, row.kind)
    )
    return ModelRef(row.name, row.version, row.kind.value, str(path), row.enabled)


def _ref(settings: Settings, rows: Sequence[RegisteredModel]) -> ModelRef:
    enabled = [row for row in rows if row.enabled]
    return version_ref(settings, enabled[0] if enabled else rows[-1])


def model_refs(
    session: Session, settings: Settings, pipeline: Iterable[str] | None = None
) -> dict[str, ModelRef]:
    """By step name, the registered models ``pipeline`` names (all without a pipeline):
    the enabled version, or the latest one marked not enabled."""
    wanted = None if pipeline is None else {s for s in pipeline if is_model_step(s)}
    if wanted is not None and not wanted:
        return {}
    grouped: dict[str, list[RegisteredModel]] = {}
    for row in _rows(session):
        if wanted is None or step_name(row.name) in wanted:
            grouped.setdefault(row.name, []).append(row)
    return {step_name(name): _ref(settings, rows) for name, rows in grouped.items()}


def registered_plugins(session: Session, settings: Settings) -> list[PluginInfo]:
    """Every registered model as a plugin (``model:<name>``), for checking rules and
    listing processors: a disabled one is listed, not enabled, as a disabled plugin is."""
    return [model_plugin_info(ref) for ref in model_refs(session, settings).values()]


def rules_name_models(settings: Settings) -> bool:
    return any(is_model_step(step) for rule in settings.rules for step in rule.pipeline)


def plugins_and_models(session: Session, settings: Settings) -> list[PluginInfo]:
    """The installed processors with the admins' choices, then the registered models: what
    a rule's pipeline may name."""
    from dicom_node.plugin_state import list_plugins

    return [*list_plugins(session), *registered_plugins(session, settings)]


def plugins_in_database(settings: Settings) -> list[PluginInfo]:
    """``registered_plugins`` read from the node's database (migrated first)."""
    from db.session import migrated_session

    with migrated_session(settings.effective_database_url) as session:
        return registered_plugins(session, settings)


__all__ = [
    "ModelConflictError",
    "ModelRegistryError",
    "StagedFile",
    "UnknownModelError",
    "UploadRefusedError",
    "UploadTooLargeError",
    "collect_garbage",
    "disable",
    "enable",
    "get_model",
    "list_models",
    "model_refs",
    "models_dir",
    "plugins_and_models",
    "record_evaluation",
    "register_upload",
    "registered_plugins",
    "remove",
    "stage_upload",
]
