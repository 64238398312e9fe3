"""``dicom-node tokens``: create, list and revoke the REST API's bearer tokens.

``create`` prints the token on stdout and nothing else there, so that it can be piped
into a secret store; it is not shown again (the database keeps its SHA-256 only).
Creating and revoking are audited as done by the OS user running the command.
"""

from __future__ import annotations

from typing import Annotated

import typer

from db.enums import TokenRole
from dicom_node.cli_base import (
    ConfigOption,
    OneLineErrorGroup,
    add_row,
    console,
    database_session,
    errors,
    new_table,
    print_table,
    printed_as_json_or_empty,
    settings_from,
)

tokens_app = typer.Typer(
    name="tokens",
    help="REST API tokens: create, list, revoke.",
    no_args_is_help=True,
    cls=OneLineErrorGroup,
)

NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="The token's name.")]


@tokens_app.command("create")
def create_command(
    name: NameArgument,
    role: Annotated[
        TokenRole,
        typer.Option(help="viewer reads; operator also retries and cancels; admin changes."),
    ],
    config: ConfigOption = None,
) -> None:
    """Create a token and print it (on stdout, once)."""
    from dicom_node.api.tokens import check_name, create_token
    from dicom_node.security.audit import Actor

    check_name(name)  # before the database is opened or migrated
    with database_session(settings_from(config)) as session:
        token = create_token(session, name, role, Actor.os_user())
    print(token)
    errors.print(
        f"created the {role} token {name!r}: keep it now, it will not be shown again",
        highlight=False,
        soft_wrap=True,
    )


@tokens_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array of objects.")] = False,
    config: ConfigOption = None,
) -> None:
    """Every token (revoked ones too): name, role, created, last used, revoked."""
    from dicom_node.api.tokens import list_tokens

    with database_session(settings_from(config)) as session:
        rows = [info.as_dict() for info in list_tokens(session)]
    if printed_as_json_or_empty(rows, as_json, "no tokens"):
        return
    table = new_table("NAME", "ROLE", "CREATED (UTC)", "CREATED BY", "LAST USED", "REVOKED")
    for row in rows:
        add_row(
            table,
            row["name"],
            row["role"],
            row["created_at"][:19],
            row["created_by"],
            (row["last_used_at"] or "-")[:19],
            (row["revoked_at"] or "-")[:19],
        )
    print_table(table)


@tokens_app.command("revoke")
def revoke_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Revoke a token: requests carrying it are refused from now on."""
    from dicom_node.api.tokens import revoke
    from dicom_node.security.audit import Actor

    with database_session(settings_from(config)) as session:
        revoke(session, name, Actor.os_user())
    console.print(f"revoked the token {name!r}", highlight=False)
