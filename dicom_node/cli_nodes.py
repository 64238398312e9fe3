"""``dicom-node nodes``: the nodes sharing this database, with their heartbeats."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import typer

from dicom_node.cli_base import (
    ConfigOption,
    add_row,
    database_session,
    new_table,
    print_table,
    printed_as_json_or_empty,
    settings_from,
)


def nodes(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the nodes on this database: running, silent past their lease, or stopped."""
    from dicom_node.nodes import list_nodes

    settings = settings_from(config)
    lease = dt.timedelta(seconds=settings.node_lease_seconds)
    with database_session(settings) as session:
        rows = list_nodes(session, lease, dt.datetime.now(dt.UTC))
    if printed_as_json_or_empty(rows, as_json, "no node has run on this database yet"):
        return
    table = new_table(
        "NAME", "STATE", "HEARTBEAT", "JOBS", "SENDING", "HOST", "PID", numeric=("JOBS", "SENDING")
    )
    for row in rows:
        add_row(
            table,
            row["name"],
            row["state"],
            f"{row['heartbeat_seconds_ago']:.0f} s ago",
            row["running_jobs"],
            row["sending_exports"],
            row["host"],
            row["pid"],
        )
    print_table(table)
