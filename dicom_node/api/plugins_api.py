"""``/api/v1/plugins``: the processor plugins (viewer) and the admin's choices for them:
enable, disable, pin to a version, unpin (admin), the same as ``dicom-node plugins``.

The list is what ``dicom_node.plugin_state.list_plugins`` discovers with the choices of the
``plugin_state`` table folded in, so a plugin registered later (a model uploaded as a
``model``-family processor) appears here without a change. Each change is a
``plugin_changed`` audit row in the change's transaction. Jobs read the choices when they
start, so a change holds for the next job.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from dicom_node.api.auth import AdminCaller, Caller, ViewerCaller
from dicom_node.api.context import get_context
from dicom_node.plugin_state import find_plugin, list_plugins, plugin_document, set_state
from processors.registry import UnknownProcessorError

router = APIRouter(tags=["plugins"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No plugin by that name"}}
PluginName = Annotated[str, Path(max_length=128)]
Document = dict[str, Any]


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64, pattern=r"^\S+$")


def _found(session: Session, name: str) -> Document:
    try:
        return plugin_document(session, find_plugin(session, name))
    except UnknownProcessorError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc


def _change(request: Request, caller: Caller, name: str, **changes: Any) -> Document:
    context = get_context(request)
    with context.sessions.begin() as session:
        _found(session, name)  # 404 before anything is written
        set_state(session, name, actor=caller.actor, **changes)
        return _found(session, name)


@router.get("/plugins", summary="Every discovered plugin: version, family, availability, choices")
def list_all(request: Request, _caller: ViewerCaller) -> list[Document]:
    with get_context(request).sessions() as session:
        return [info.as_dict() for info in list_plugins(session)]


@router.get(
    "/plugins/{name}",
    summary="One plugin, its parameters' JSON schema and the rules that use it",
    responses=NOT_FOUND,
)
def get_one(request: Request, name: PluginName, _caller: ViewerCaller) -> Document:
    with get_context(request).sessions() as session:
        return _found(session, name)


@router.post("/plugins/{name}/enable", summary="Let rules use the plugin", responses=NOT_FOUND)
def enable(request: Request, name: PluginName, caller: AdminCaller) -> Document:
    return _change(request, caller, name, enabled=True)


@router.post(
    "/plugins/{name}/disable",
    summary="Stop rules from using the plugin (their jobs fail until it is enabled)",
    responses=NOT_FOUND,
)
def disable(request: Request, name: PluginName, caller: AdminCaller) -> Document:
    return _change(request, caller, name, enabled=False)


@router.post(
    "/plugins/{name}/pin",
    summary="Run the plugin only while its installed version is this one",
    responses=NOT_FOUND,
)
def pin(request: Request, name: PluginName, body: PinRequest, caller: AdminCaller) -> Document:
    return _change(request, caller, name, pinned_version=body.version)


@router.post("/plugins/{name}/unpin", summary="Remove the version pin", responses=NOT_FOUND)
def unpin(request: Request, name: PluginName, caller: AdminCaller) -> Document:
    return _change(request, caller, name, unpin=True)
