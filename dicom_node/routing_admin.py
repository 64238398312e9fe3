"""An administrator's changes to rules and destinations while the node runs (the REST API and
the dashboard call these): create, update, delete, enable, disable, and revert to an
earlier version.

Each change is validated as the configuration file is (the ``Rule``/``Destination`` model,
then the checks the file's settings get: a rule names defined destinations and usable
processors with parameters they take, a de-identifying destination needs the key, and the
whole routing must still load), stored in ``routing_entries`` with origin ``api``, kept as a
new version in ``routing_history`` and audited, all in the caller's transaction. The
dispatcher picks it up at its next reload.

Entries from the configuration file (origin ``config``) are the file's: the node copies
the file over them at every start. They cannot be updated, deleted or reverted here
(``EntryConflictError``: edit the file); a rule of the file can be disabled and enabled, as
an emergency switch that lasts until the next start (``file_note`` says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import RoutingEntry, RoutingEntryKind, RoutingHistory, RoutingOrigin, utcnow
from dicom_node.config import Destination, Rule, Settings, rule_plugin_problems
from dicom_node.routing_store import record_change
from dicom_node.security import audit
from processors.errors import BadInputError
from processors.registry import PluginInfo

Loc = tuple[str | int, ...]
MODELS: dict[RoutingEntryKind, type[Rule] | type[Destination]] = {
    RoutingEntryKind.RULE: Rule,
    RoutingEntryKind.DESTINATION: Destination,
}


class UnknownEntryError(BadInputError):
    """No rule or destination (or no such version of it) by that name."""


class EntryConflictError(BadInputError):
    """The change cannot be made in the entry's present state (taken name, an entry of the
    configuration file, a destination still named by a rule)."""


class InvalidEntryError(BadInputError):
    """The definition is refused; ``loc`` is the field at fault, as in a pydantic error."""

    def __init__(self, message: str, loc: Loc = ()) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class EntryView:
    """What an entry looks like to an administrator: the full definition (defaults
    included), its origin and version, and for a destination the rules that name it."""

    kind: RoutingEntryKind
    name: str
    origin: RoutingOrigin
    version: int
    definition: dict[str, Any]
    updated_at: str
    used_by: tuple[str, ...] = ()
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "origin": str(self.origin),
            "version": self.version,
            "updated_at": self.updated_at,
            "definition": self.definition,
        }
        if self.kind == RoutingEntryKind.RULE:
            document["enabled"] = self.definition.get("enabled", True)
        else:
            document["used_by"] = list(self.used_by)
        if self.note:
            document["note"] = self.note
        return document


def file_note(kind: RoutingEntryKind, name: str) -> str:
    return (
        f"{kind} {name!r} comes from the configuration file: the file's definition comes"
        " back at the next start; change the file to keep this"
    )


# -- reading ----------------------------------------------------------------------------------


def _entries(session: Session, kind: RoutingEntryKind) -> list[RoutingEntry]:
    return list(
        session.scalars(
            select(RoutingEntry)
            .where(RoutingEntry.kind == kind)
            .order_by(RoutingEntry.position, RoutingEntry.name)
        )
    )


def _row(session: Session, kind: RoutingEntryKind, name: str) -> RoutingEntry | None:
    return session.get(RoutingEntry, (kind, name))


def _existing(session: Session, kind: RoutingEntryKind, name: str) -> RoutingEntry:
    row = _row(session, kind, name)
    if row is None:
        known = ", ".join(entry.name for entry in _entries(session, kind)) or "none"
        raise UnknownEntryError(f"no {kind} named {name!r} (defined: {known})")
    return row


def _versions(session: Session, kind: RoutingEntryKind) -> dict[str, int]:
    rows = session.execute(
        select(RoutingHistory.name, func.max(RoutingHistory.version))
        .where(RoutingHistory.kind == kind)
        .group_by(RoutingHistory.name)
    )
    return {name: version for name, version in rows}


def _rules_naming(session: Session) -> dict[str, list[str]]:
    """Destination name -> the rules that send to it."""
    naming: dict[str, list[str]] = {}
    for rule in _entries(session, RoutingEntryKind.RULE):
        for destination in rule.definition.get("destinations", ()):
            naming.setdefault(destination, []).append(rule.name)
    return naming


def _view(
    row: RoutingEntry, version: int, used_by: Sequence[str] = (), note: str | None = None
) -> EntryView:
    model = MODELS[row.kind].model_validate(row.definition)
    return EntryView(
        kind=row.kind,
        name=row.name,
        origin=row.origin,
        version=version,
        definition=model.model_dump(mode="json"),
        updated_at=row.updated_at.isoformat(),
        used_by=tuple(used_by),
        note=note,
    )


def list_entries(session: Session, kind: RoutingEntryKind) -> list[EntryView]:
    versions = _versions(session, kind)
    naming = _rules_naming(session) if kind == RoutingEntryKind.DESTINATION else {}
    return [
        _view(row, versions.get(row.name, 0), naming.get(row.name, ()))
        for row in _entries(session, kind)
    ]


def get_entry(session: Session, kind: RoutingEntryKind, name: str) -> EntryView:
    row = _existing(session, kind, name)
    naming = _rules_naming(session) if kind == RoutingEntryKind.DESTINATION else {}
    return _view(row, _versions(session, kind).get(name, 0), naming.get(name, ()))


def history(session: Session, kind: RoutingEntryKind, name: str) -> list[RoutingHistory]:
    """Every version of the entry, oldest first (also of one deleted since)."""
    rows = list(
        session.scalars(
            select(RoutingHistory)
            .where(RoutingHistory.kind == kind, RoutingHistory.name == name)
            .order_by(RoutingHistory.version)
        )
    )
    if not rows and _row(session, kind, name) is None:
        _existing(session, kind, name)  # raises, naming the entries there are
    return rows


# -- validating -------------------------------------------------------------------------------


def stored_rule(session: Session, name: str) -> Rule:
    return Rule.model_validate(_existing(session, RoutingEntryKind.RULE, name).definition)


def check_rule(session: Session, rule: Rule, plugins: Sequence[PluginInfo]) -> None:
    """Refuse (``InvalidEntryError``) a rule naming an undefined destination, or an unknown,
    disabled or unavailable processor, giving a processor parameters it does not take, or
    naming one that takes no 2-D image while matching only 2-D modalities."""
    known = {row.name for row in _entries(session, RoutingEntryKind.DESTINATION)}
    for index, name in enumerate(rule.destinations):
        if name not in known:
            raise InvalidEntryError(
                f"destination {name!r} is not defined (defined: {sorted(known) or 'none'})",
                ("destinations", index),
            )
    by_name = {info.name: info for info in plugins}
    for index, step in enumerate(rule.pipeline):
        info = by_name.get(step)
        if info is not None and not info.usable:
            why = "disabled" if not info.enabled else f"unavailable: {info.reason}"
            raise InvalidEntryError(f"processor {step!r} is {why}", ("pipeline", index))
    params: Mapping[str, type[BaseModel]] = {
        info.name: info.processor.Params
        for info in plugins
        if info.usable and info.processor is not None
    }
    accepts = {info.name: info.accepts for info in plugins if info.processor is not None}
    for loc, message in rule_plugin_problems(rule, by_name, params, accepts):
        if loc[0] == "pipeline":
            installed = ", ".join(sorted(by_name)) or "none"
            message = f"{message} (installed processors: {installed})"
        raise InvalidEntryError(message, loc)


def _check_destination(session: Session, settings: Settings, destination: Destination) -> None:
    if destination.deidentify and settings.spool_encryption_key_file is None:
        raise InvalidEntryError(
            "deidentify needs spool_encryption_key_file in the node's settings: the pseudonym"
            " map is sealed with its key",
            ("deidentify",),
        )
    known = {row.name for row in _entries(session, RoutingEntryKind.DESTINATION)}
    for index, name in enumerate(destination.results_to):
        if name not in known or name == destination.name:
            raise InvalidEntryError(
                f"results_to names {name!r}, which is not another defined destination",
                ("results_to", index),
            )


def _check_whole_routing(session: Session, settings: Settings) -> None:
    """The routing with the change, validated as the configuration file's settings are."""
    entries = {kind: _entries(session, kind) for kind in RoutingEntryKind}
    values = settings.model_dump()
    values["destinations"] = [row.definition for row in entries[RoutingEntryKind.DESTINATION]]
    values["rules"] = [row.definition for row in entries[RoutingEntryKind.RULE]]
    try:
        Settings.model_validate(values)
    except ValidationError as exc:
        messages = "; ".join(error["msg"] for error in exc.errors())
        raise InvalidEntryError(f"the routing would not load: {messages}") from exc


def _validated(kind: RoutingEntryKind, definition: Mapping[str, Any]) -> Rule | Destination:
    try:
        return MODELS[kind].model_validate(definition)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InvalidEntryError(error["msg"], tuple(error["loc"])) from exc


# -- changing ---------------------------------------------------------------------------------


def _kind_of(item: Rule | Destination) -> RoutingEntryKind:
    return RoutingEntryKind.RULE if isinstance(item, Rule) else RoutingEntryKind.DESTINATION


def _refuse_file_entry(row: RoutingEntry, doing: str) -> None:
    if row.origin == RoutingOrigin.CONFIG:
        raise EntryConflictError(
            f"{row.kind} {row.name!r} comes from the configuration file, which is copied over"
            f" it at every start: {doing} it there"
        )


def _save(
    session: Session,
    settings: Settings,
    item: Rule | Destination,
    *,
    change: str,
    actor: audit.Actor,
    plugins: Sequence[PluginInfo],
    details: Mapping[str, str | int] | None = None,
) -> EntryView:
    """Check ``item``, write it (new row, origin ``api``, or over the old one), its version
    and audit row."""
    kind = _kind_of(item)
    if isinstance(item, Rule):
        if item.enabled or change != "disabled":
            check_rule(session, item, plugins)
    else:
        _check_destination(session, settings, item)
    definition = item.model_dump(mode="json", exclude_defaults=True)
    row = _row(session, kind, item.name)
    if row is None:
        last = session.scalar(
            select(func.max(RoutingEntry.position)).where(RoutingEntry.kind == kind)
        )
        position = (last or 0) + 1
        row = RoutingEntry(kind=kind, name=item.name, position=position, origin=RoutingOrigin.API)
        session.add(row)
    row.definition = definition
    row.updated_at = utcnow()
    session.flush()
    _check_whole_routing(session, settings)
    version = record_change(
        session, kind, item.name, change, definition, row.origin, actor, details
    )
    note = file_note(kind, item.name) if row.origin == RoutingOrigin.CONFIG else None
    used_by = (
        _rules_naming(session).get(item.name, ()) if kind == RoutingEntryKind.DESTINATION else ()
    )
    return _view(row, version, used_by, note)


def create_entry(
    session: Session,
    settings: Settings,
    item: Rule | Destination,
    actor: audit.Actor,
    plugins: Sequence[PluginInfo],
) -> EntryView:
    kind = _kind_of(item)
    existing = _row(session, kind, item.name)
    if existing is not None:
        raise EntryConflictError(
            f"a {kind} named {item.name!r} exists already ({existing.origin}): update it instead"
        )
    return _save(session, settings, item, change="created", actor=actor, plugins=plugins)


def update_entry(
    session: Session,
    settings: Settings,
    name: str,
    item: Rule | Destination,
    actor: audit.Actor,
    plugins: Sequence[PluginInfo],
) -> EntryView:
    kind = _kind_of(item)
    if item.name != name:
        raise InvalidEntryError(
            f"the name in the body ({item.name!r}) is not the one in the path ({name!r}):"
            " create a new entry to rename one",
            ("name",),
        )
    _refuse_file_entry(_existing(session, kind, name), "change")
    return _save(session, settings, item, change="updated", actor=actor, plugins=plugins)


def set_rule_enabled(
    session: Session,
    settings: Settings,
    name: str,
    enabled: bool,
    actor: audit.Actor,
    plugins: Sequence[PluginInfo],
) -> EntryView:
    """Enable or disable a rule (of the file too: until the next start). Setting the state
    it has already changes nothing and records nothing."""
    row = _existing(session, RoutingEntryKind.RULE, name)
    rule = Rule.model_validate(row.definition)
    if rule.enabled == enabled:
        return get_entry(session, RoutingEntryKind.RULE, name)
    changed = rule.model_copy(update={"enabled": enabled})
    change = "enabled" if enabled else "disabled"
    return _save(session, settings, changed, change=change, actor=actor, plugins=plugins)


def delete_entry(
    session: Session, settings: Settings, kind: RoutingEntryKind, name: str, actor: audit.Actor
) -> int:
    """Delete an administrator's entry; returns the version that records the deletion. A
    destination that a rule or another destination's ``results_to`` names is kept."""
    row = _existing(session, kind, name)
    _refuse_file_entry(row, "delete")
    if kind == RoutingEntryKind.DESTINATION:
        rules = _rules_naming(session).get(name)
        if rules:
            raise EntryConflictError(
                f"destination {name!r} is named by the rules {', '.join(rules)}: change them first"
            )
        for other in _entries(session, kind):
            if name in other.definition.get("results_to", ()):
                raise EntryConflictError(
                    f"destination {name!r} is named by results_to of destination {other.name!r}"
                )
    session.delete(row)
    session.flush()
    version = record_change(session, kind, name, "deleted", None, row.origin, actor)
    return version


def revert_entry(
    session: Session,
    settings: Settings,
    kind: RoutingEntryKind,
    name: str,
    version: int,
    actor: audit.Actor,
    plugins: Sequence[PluginInfo],
) -> EntryView:
    """Make ``version`` of the entry its definition again, as a new version (an entry
    deleted since is made again). Validated as a new definition is: a version naming a
    destination that is gone, say, is refused."""
    old = session.scalar(
        select(RoutingHistory).where(
            RoutingHistory.kind == kind,
            RoutingHistory.name == name,
            RoutingHistory.version == version,
        )
    )
    if old is None:
        versions = [row.version for row in history(session, kind, name)]
        raise UnknownEntryError(f"{kind} {name!r} has no version {version} (versions: {versions})")
    if old.definition is None:
        raise InvalidEntryError(
            f"version {version} of {kind} {name!r} is its deletion: revert to an earlier one",
            ("version",),
        )
    row = _row(session, kind, name)
    if row is not None:
        _refuse_file_entry(row, "change")
    item = _validated(kind, old.definition)
    return _save(
        session,
        settings,
        item,
        change="reverted",
        actor=actor,
        plugins=plugins,
        details={"reverted_to": version},
    )
