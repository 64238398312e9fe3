"""``/api/v1/models``: models registered by admins (``dicom_node.model_registry``).

Viewers list the models and read a model's versions with their manifests and
evaluations; admins upload (multipart: ``file``, the ONNX network or a ``.skops``
classifier or regressor, and ``manifest``, the ONNX network's manifest JSON), enable,
disable and delete. An upload is checked before anything is registered and refused with
a 422 naming the field (``manifest.patch_size: ...``, ``file: not an ONNX model ...``,
``inputs[0].shape: ...``); a body over ``model_upload_max_bytes`` is a 413. The body is
read only after the caller's token is checked, and written to disk as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dicom_node import model_registry
from dicom_node.api.auth import AdminCaller, ViewerCaller
from dicom_node.api.context import ApiContext, get_context
from processors.model_upload import UploadRefusedError

router = APIRouter(tags=["models"])

T = TypeVar("T")

MANIFEST_MAX_BYTES = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "The ONNX network, or a .skops classifier or "
                            "regressor (dicom-node-model/1)",
                        },
                        "manifest": {
                            "type": "string",
                            "description": "The ONNX network's manifest "
                            "(dicom-node-onnx-segmentation/1, docs/models.md); none for .skops",
                        },
                    },
                }
            }
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No registered model (or version) of that name"},
    409: {"description": "The version exists already, or it has no evaluation"},
}

VersionQuery = Annotated[
    str | None, Query(max_length=64, description="A version (default: the latest uploaded)")
]


def _answer(call: Callable[[], T]) -> T:
    """Run ``call``, turning the registry's refusals into their HTTP statuses."""
    try:
        return call()
    except model_registry.UnknownModelError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except model_registry.ModelConflictError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except model_registry.UploadTooLargeError as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None


@router.get("", summary="Registered models: name, step, kind, versions, enabled version")
def list_models(request: Request, caller: ViewerCaller) -> list[dict[str, Any]]:
    context = get_context(request)
    with context.sessions() as session:
        return model_registry.list_models(session)


@router.get(
    "/{name}",
    summary="A model's versions with their manifests and evaluations",
    responses={404: ERRORS[404]},
)
def get_model(name: str, request: Request, caller: ViewerCaller) -> dict[str, Any]:
    context = get_context(request)
    with context.sessions() as session:
        return _answer(lambda: model_registry.get_model(session, name))


@router.post(
    "",
    summary="Upload a model (registered disabled, after its checks)",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=UPLOAD_BODY,
    responses={
        409: ERRORS[409],
        413: {"description": "Larger than model_upload_max_bytes"},
        422: {"description": "The upload is refused: the detail names the field"},
    },
)
async def upload_model(request: Request, caller: AdminCaller) -> dict[str, Any]:
    context = get_context(request)
    limit = context.settings.model_upload_max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MANIFEST_MAX_BYTES + MULTIPART_OVERHEAD:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"file: larger than model_upload_max_bytes ({limit} bytes)",
        )
    try:
        form = await request.form(max_files=2, max_fields=2, max_part_size=MANIFEST_MAX_BYTES)
    except Exception as exc:  # starlette's MultiPartException, or a body that is no form
        raise UploadRefusedError("body", f"not a multipart form: {exc}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise UploadRefusedError("file", "missing: the model file is the form's 'file' part")
        manifest = form.get("manifest")
        manifest_text = await manifest.read() if isinstance(manifest, UploadFile) else manifest
        return await run_in_threadpool(_register, context, upload, manifest_text, caller.actor)
    finally:
        await form.close()


def _register(
    context: ApiContext, upload: UploadFile, manifest_text: str | bytes | None, actor: Any
) -> dict[str, Any]:
    def register() -> dict[str, Any]:
        staged = model_registry.stage_upload(upload.file, context.settings)
        with context.sessions.begin() as session:
            row = model_registry.register_upload(
                session, context.settings, staged, manifest_text, actor
            )
            return model_registry.get_model(session, row.name)

    return _answer(register)


@router.post(
    "/{name}/enable",
    summary="Run this version for `model:<name>` (needs an evaluation unless force=true)",
    responses=ERRORS,
)
def enable_model(
    name: str,
    request: Request,
    caller: AdminCaller,
    version: VersionQuery = None,
    force: Annotated[bool, Query(description="Enable a version that has no evaluation")] = False,
) -> dict[str, Any]:
    context = get_context(request)

    def enable() -> dict[str, Any]:
        with context.sessions.begin() as session:
            model_registry.enable(session, name, caller.actor, version=version, force=force)
            return model_registry.get_model(session, name)

    return _answer(enable)


@router.post("/{name}/disable", summary="Run no version of the model", responses={404: ERRORS[404]})
def disable_model(name: str, request: Request, caller: AdminCaller) -> dict[str, Any]:
    context = get_context(request)

    def disable() -> dict[str, Any]:
        with context.sessions.begin() as session:
            model_registry.disable(session, name, caller.actor)
            return model_registry.get_model(session, name)

    return _answer(disable)


@router.delete(
    "/{name}",
    summary="Delete the model (or one version) and the files no other version uses",
    responses={404: ERRORS[404]},
)
def delete_model(
    name: str, request: Request, caller: AdminCaller, version: VersionQuery = None
) -> dict[str, Any]:
    context = get_context(request)

    def remove() -> dict[str, Any]:
        with context.sessions.begin() as session:
            model_registry.remove(session, name, caller.actor, version=version)
        with context.sessions() as session:
            removed = model_registry.collect_garbage(session, context.settings)
        return {"deleted": name, "version": version, "files_removed": len(removed)}

    return _answer(remove)
