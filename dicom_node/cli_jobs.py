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
