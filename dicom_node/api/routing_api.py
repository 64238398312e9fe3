"""``/api/v1/rules`` and ``/api/v1/destinations``: read (viewer), change (admin), and try a
rule on the studies already received (``POST /rules/test``, admin).

The routes are thin: ``dicom_node.routing_admin`` validates, stores, versions and audits
each change; ``dicom_node.rule_tester`` tries a rule. A body is validated by the model that
validates ``node.toml`` (``Rule``, ``Destination``); a refusal is a 422 whose ``detail``
is FastAPI's list of ``{loc, msg, type}``, ``loc`` naming the field. An unknown entry is a
404, a change the entry's state forbids (a taken name, an entry of the configuration file,
a destination a rule still names) a 409 with the reason. After a change the dispatcher
reloads the routing at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import RoutingEntryKind
from dicom_node.api.auth import AdminCaller, Caller, ViewerCaller
from dicom_node.api.context import ApiContext, get_context
from dicom_node.config import Destination, Rule
from dicom_node.model_registry import plugins_and_models
from dicom_node.routing_admin import (
    EntryConflictError,
    InvalidEntryError,
    UnknownEntryError,
    create_entry,
    delete_entry,
    get_entry,
    history,
    list_entries,
    revert_entry,
    set_rule_enabled,
    update_entry,
)
from dicom_node.rule_tester import DEFAULT_STUDY_LIMIT, MAX_STUDY_LIMIT, try_stored_or_given

router = APIRouter(tags=["routing"])

RULE = RoutingEntryKind.RULE
DESTINATION = RoutingEntryKind.DESTINATION
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"description": "No such rule or destination (or version)"}}
CONFLICT: Responses = {
    409: {"description": "Not possible in the entry's state; the detail says why"}
}

Document = dict[str, Any]


class RuleTestRequest(BaseModel):
    """Try ``rule`` (a definition, stored or not) or the stored rule ``name`` on the
    ``limit`` most recent studies, received since ``since`` when given."""

    model_config = ConfigDict(extra="forbid")

    rule: Rule | None = None
    name: str | None = Field(None, max_length=128)
    since: dt.datetime | None = None
    limit: int = Field(DEFAULT_STUDY_LIMIT, ge=1, le=MAX_STUDY_LIMIT)

    @model_validator(mode="after")
    def _one_rule(self) -> RuleTestRequest:
        if (self.rule is None) == (self.name is None):
            raise ValueError("give either rule (a definition) or name (a stored rule)")
        return self


@contextmanager
def _answering() -> Iterator[None]:
    """Turn ``routing_admin``'s refusals into 404, 409 and 422 answers."""
    try:
        yield
    except UnknownEntryError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(exc)) from exc
    except EntryConflictError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(exc)) from exc
    except IntegrityError as exc:  # another request changed the same entry meanwhile
        reason = "the entry was changed by another request meanwhile: read it and try again"
        raise HTTPException(status.HTTP_409_CONFLICT, detail=reason) from exc
    except InvalidEntryError as exc:
        loc = ["query", "version"] if exc.loc == ("version",) else ["body", *exc.loc]
        errors = [{"loc": loc, "msg": str(exc), "type": "value_error"}]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=errors) from exc


@contextmanager
def _changing(request: Request) -> Iterator[tuple[Session, ApiContext]]:
    """A transaction for one change (committed with its audit row), then the dispatcher
    told to reload the routing."""
    context = get_context(request)
    with _answering(), context.sessions.begin() as session:
        yield session, context
    context.routing_changed()
    context.wake_dispatcher()


def _read(request: Request) -> Session:
    return get_context(request).sessions()


def _history(request: Request, kind: RoutingEntryKind, name: str) -> list[Document]:
    with _read(request) as session, _answering():
        return [
            {
                "version": row.version,
                "change": row.change,
                "origin": str(row.origin),
                "actor": row.actor,
                "changed_at": row.changed_at.isoformat(),
                "definition": row.definition,
            }
            for row in history(session, kind, name)
        ]


def _revert(
    request: Request, caller: Caller, kind: RoutingEntryKind, name: str, version: int
) -> Document:
    with _changing(request) as (session, context):
        plugins = plugins_and_models(session, context.settings)
        view = revert_entry(session, context.settings, kind, name, version, caller.actor, plugins)
    return view.as_dict()


def _delete(request: Request, caller: Caller, kind: RoutingEntryKind, name: str) -> Document:
    with _changing(request) as (session, context):
        version = delete_entry(session, context.settings, kind, name, caller.actor)
    return {"name": name, "deleted": True, "version": version}


def _save(
    request: Request, caller: Caller, item: Rule | Destination, name: str | None = None
) -> Document:
    with _changing(request) as (session, context):
        plugins = plugins_and_models(session, context.settings)
        if name is None:
            view = create_entry(session, context.settings, item, caller.actor, plugins)
        else:
            view = update_entry(session, context.settings, name, item, caller.actor, plugins)
    return view.as_dict()


VersionQuery = Annotated[
    int, Query(ge=1, le=2**31 - 1, description="the version to make current again")
]


# -- rules ------------------------------------------------------------------------------------


@router.get("/rules", summary="Every rule, in the order the dispatcher checks them")
def list_rules(request: Request, _caller: ViewerCaller) -> list[Document]:
    with _read(request) as session:
        return [view.as_dict() for view in list_entries(session, RULE)]


@router.post(
    "/rules/test",
    summary="Try a rule on the studies already received: which series it takes, why not others",
    responses=NOT_FOUND,
)
def test_rule(request: Request, body: RuleTestRequest, _caller: AdminCaller) -> Document:
    """Admins only, though nothing changes: the rule's regular expressions run on the node,
    and one written to backtrack for ever would hold a server thread."""
    context = get_context(request)
    with _read(request) as session, _answering():
        trial = try_stored_or_given(
            session, context.settings, body.rule, body.name, since=body.since, limit=body.limit
        )
        return trial.as_dict()


@router.get("/rules/{name}", summary="One rule", responses=NOT_FOUND)
def get_rule(request: Request, name: str, _caller: ViewerCaller) -> Document:
    with _read(request) as session, _answering():
        return get_entry(session, RULE, name).as_dict()


@router.post(
    "/rules", status_code=status.HTTP_201_CREATED, summary="Create a rule", responses=CONFLICT
)
def create_rule(request: Request, rule: Rule, caller: AdminCaller) -> Document:
    return _save(request, caller, rule)


@router.put(
    "/rules/{name}", summary="Replace a rule's definition", responses={**NOT_FOUND, **CONFLICT}
)
def update_rule(request: Request, name: str, rule: Rule, caller: AdminCaller) -> Document:
    return _save(request, caller, rule, name)


@router.delete("/rules/{name}", summary="Delete a rule", responses={**NOT_FOUND, **CONFLICT})
def delete_rule(request: Request, name: str, caller: AdminCaller) -> Document:
    return _delete(request, caller, RULE, name)


@router.post("/rules/{name}/enable", summary="Enable a rule", responses=NOT_FOUND)
def enable_rule(request: Request, name: str, caller: AdminCaller) -> Document:
    with _changing(request) as (session, context):
        plugins = plugins_and_models(session, context.settings)
        view = set_rule_enabled(session, context.settings, name, True, caller.actor, plugins)
    return view.as_dict()


@router.post("/rules/{name}/disable", summary="Disable a rule", responses=NOT_FOUND)
def disable_rule(request: Request, name: str, caller: AdminCaller) -> Document:
    with _changing(request) as (session, context):
        plugins = plugins_and_models(session, context.settings)
        view = set_rule_enabled(session, context.settings, name, False, caller.actor, plugins)
    return view.as_dict()


@router.get("/rules/{name}/history", summary="Every version of a rule", responses=NOT_FOUND)
def rule_history(request: Request, name: str, _caller: ViewerCaller) -> list[Document]:
    return _history(request, RULE, name)


@router.post(
    "/rules/{name}/revert",
    summary="Make an earlier version of a rule current again (a new version)",
    responses={**NOT_FOUND, **CONFLICT},
)
def revert_rule(
    request: Request, name: str, version: VersionQuery, caller: AdminCaller
) -> Document:
    return _revert(request, caller, RULE, name, version)


# -- destinations -----------------------------------------------------------------------------


@router.get("/destinations", summary="Every destination, with the rules that send to it")
def list_destinations(request: Request, _caller: ViewerCaller) -> list[Document]:
    with _read(request) as session:
        return [view.as_dict() for view in list_entries(session, DESTINATION)]


@router.get("/destinations/{name}", summary="One destination", responses=NOT_FOUND)
def get_destination(request: Request, name: str, _caller: ViewerCaller) -> Document:
    with _read(request) as session, _answering():
        return get_entry(session, DESTINATION, name).as_dict()


@router.post(
    "/destinations",
    status_code=status.HTTP_201_CREATED,
    summary="Create a destination",
    responses=CONFLICT,
)
def create_destination(request: Request, destination: Destination, caller: AdminCaller) -> Document:
    return _save(request, caller, destination)


@router.put(
    "/destinations/{name}",
    summary="Replace a destination's definition",
    responses={**NOT_FOUND, **CONFLICT},
)
def update_destination(
    request: Request, name: str, destination: Destination, caller: AdminCaller
) -> Document:
    return _save(request, caller, destination, name)


@router.delete(
    "/destinations/{name}",
    summary="Delete a destination no rule names",
    responses={**NOT_FOUND, **CONFLICT},
)
def delete_destination(request: Request, name: str, caller: AdminCaller) -> Document:
    return _delete(request, caller, DESTINATION, name)


@router.get(
    "/destinations/{name}/history", summary="Every version of a destination", responses=NOT_FOUND
)
def destination_history(request: Request, name: str, _caller: ViewerCaller) -> list[Document]:
    return _history(request, DESTINATION, name)


@router.post(
    "/destinations/{name}/revert",
    summary="Make an earlier version of a destination current again (a new version)",
    responses={**NOT_FOUND, **CONFLICT},
)
def revert_destination(
    request: Request, name: str, version: VersionQuery, caller: AdminCaller
) -> Document:
    return _revert(request, caller, DESTINATION, name, version)
