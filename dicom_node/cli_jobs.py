"""``dicom-node jobs cancel`` and ``dicom-node exports cancel``: what the REST API's
operators may do, on the node's machine, audited as done by the OS user."""

from __future__ import annotations

from typing import Annotated

import typer

from dicom_node.cli_base import ConfigOption, console, database_session, settings_from
from processors.errors import BadInputError


def jobs_cancel(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="The job's id.")],
    config: ConfigOption = None,
) -> None:
    """Cancel a queued or running job: it runs no more (its node stops the run) and
    nothing of it is sent after now, unless it is retried."""
    from dicom_node.jobs.state import cancel
    from dicom_node.security.audit import Actor

    with database_session(settings_from(config)) as session:
        if cancel(session, job_id, actor=Actor.os_user()) is None:
            raise BadInputError(f"no job with id {job_id}")
    console.print(f"job {job_id} is cancelled", highlight=False)


def exports_cancel(
    export_id: Annotated[int, typer.Argument(metavar="ID", help="The export's id.")],
    config: ConfigOption = None,
) -> None:
    """Cancel a pending or failed export: it is not sent unless retried."""
    from dicom_node.export.queue import cancel
    from dicom_node.security.audit import Actor

    with database_session(settings_from(config)) as session:
        if cancel(session, export_id, actor=Actor.os_user()) is None:
            raise BadInputError(f"no export with id {export_id}")
    console.print(f"export {export_id} is cancelled", highlight=False)


def replay(
    since: Annotated[
        str, typer.Option("--since", help="Failed since: 30m, 2h, 7d or an ISO 8601 time.")
    ],
    rule: Annotated[str | None, typer.Option(help="Only this rule's jobs and outputs.")] = None,
    destination: Annotated[
        str | None, typer.Option(help="Only exports to this destination (no jobs).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be queued again; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Queue again the jobs and exports that used all their attempts (dead letters)."""
    import json

    from dicom_node.queries.since import parse_since
    from dicom_node.replay import replay as replay_failed
    from dicom_node.security.audit import Actor

    moment = parse_since(since)
    with database_session(settings_from(config)) as session:
        report = replay_failed(
            session,
            moment,
            actor=Actor.os_user(),
            rule=rule,
            destination=destination,
            dry_run=dry_run,
        )
    if as_json:
        console.print_json(json.dumps(report.as_dict()))
        return
    verb = "would queue" if dry_run else "queued"
    console.print(
        f"{verb} again: {len(report.jobs)} failed job(s)"
        f"{' ' + str(report.jobs) if report.jobs else ''}, {len(report.exports)} failed"
        f" export(s){' ' + str(report.exports) if report.exports else ''}",
        highlight=False,
    )
