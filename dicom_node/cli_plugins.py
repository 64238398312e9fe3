"""``dicom-node plugins``: list, show, enable, disable, pin and unpin processor plugins.

The admin's choices are stored in the database table ``plugin_state``; the database URL
comes from the settings (``--config``, default ``config/node.toml`` when it exists, and
``DICOM_NODE_*`` variables).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicom_node.cli_base import (
    ConfigOption,
    OneLineErrorGroup,
    add_row,
    database_session,
    new_table,
    print_table,
    printed_as_json_or_empty,
    settings_from,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

plugins_app = typer.Typer(
    name="plugins",
    help="Processor plugins: list, inspect, enable, disable, pin.",
    no_args_is_help=True,
    cls=OneLineErrorGroup,
)


def _plugins(session: Session) -> list[Any]:
    from dicom_node.plugin_state import list_plugins

    return list_plugins(session)


def _find(session: Session, name: str) -> Any:
    from dicom_node.plugin_state import find_plugin

    return find_plugin(session, name)


@plugins_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array of objects")] = False,
    config: ConfigOption = None,
) -> None:
    """Every discovered plugin: version, family, the images it takes, availability (with
    reason), enabled."""
    with database_session(settings_from(config)) as session:
        plugins = _plugins(session)
    if printed_as_json_or_empty([p.as_dict() for p in plugins], as_json, "no plugins found"):
        return
    table = new_table(
        "NAME", "VERSION", "FAMILY", "TAKES", "AVAILABLE", "ENABLED", "PINNED", "REASON"
    )
    for p in plugins:
        add_row(
            table,
            p.name,
            p.version or "-",
            p.family or "-",
            p.accepts.describe() if p.processor is not None else "-",
            "yes" if p.available else "no",
            "yes" if p.enabled else "no",
            p.pinned_version or "-",
            p.reason,
        )
    print_table(table)


@plugins_app.command("show")
def show_command(name: str, config: ConfigOption = None) -> None:
    """One plugin's details, its parameters' JSON schema and the rules that use it."""
    from dicom_node.plugin_state import plugin_document

    with database_session(settings_from(config)) as session:
        document = plugin_document(session, _find(session, name))
    typer.echo(json.dumps(document, indent=2))


def _set(name: str, config: Path | None, **changes: Any) -> Any:
    from dicom_node.plugin_state import set_state

    with database_session(settings_from(config)) as session:
        info = _find(session, name)
        set_state(session, info.name, **changes)
        return _find(session, name)


@plugins_app.command("enable")
def enable_command(name: str, config: ConfigOption = None) -> None:
    """Let routing rules use the plugin."""
    info = _set(name, config, enabled=True)
    suffix = "" if info.available else f" (but unavailable: {info.reason})"
    typer.echo(f"enabled {info.name}{suffix}")


@plugins_app.command("disable")
def disable_command(name: str, config: ConfigOption = None) -> None:
    """Stop routing rules from using the plugin."""
    info = _set(name, config, enabled=False)
    typer.echo(f"disabled {info.name}")


@plugins_app.command("pin")
def pin_command(name: str, version: str, config: ConfigOption = None) -> None:
    """Only run the plugin while its installed version is VERSION."""
    info = _set(name, config, pinned_version=version)
    suffix = "" if info.available else f" (now unavailable: {info.reason})"
    typer.echo(f"pinned {info.name} to {version}{suffix}")


@plugins_app.command("unpin")
def unpin_command(name: str, config: ConfigOption = None) -> None:
    """Remove the version pin."""
    info = _set(name, config, unpin=True)
    typer.echo(f"unpinned {info.name}")
