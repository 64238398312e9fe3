"""The `dicom-node` command line."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from db.enums import ExportState, JobState
from dicom_node import __version__
from dicom_node.cli_audit import audit_command, record_phi_read, start_audit_forwarding
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
from dicom_node.cli_deid import deidentify
from dicom_node.cli_jobs import exports_cancel, jobs_cancel, replay
from dicom_node.cli_models import models_app
from dicom_node.cli_nodes import nodes
from dicom_node.cli_plugins import plugins_app
from dicom_node.cli_retention import retention
from dicom_node.cli_tls import TlsCaOption, TlsCertOption, TlsKeyOption, TlsOption, tls_context
from dicom_node.cli_tokens import tokens_app
from dicom_node.config import Settings, validate_ae_title
from processors.errors import BadInputError, OperationFailedError

app = typer.Typer(
    name="dicom-node",
    help="A DICOM node that receives studies, processes them and sends results to the PACS.",
    no_args_is_help=True,
    add_completion=False,
    cls=OneLineErrorGroup,
)
db_app = typer.Typer(
    help="Database schema management.", no_args_is_help=True, cls=OneLineErrorGroup
)
app.add_typer(db_app, name="db")
app.add_typer(plugins_app, name="plugins", help="Processor plugins: list, show, enable, pin.")
app.command("deidentify")(deidentify)
app.command("audit")(audit_command)
app.add_typer(tokens_app)
app.add_typer(models_app)


def progress_bar(label: str) -> Progress:
    """A bar on stderr, so stdout stays for results."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=False,
    )


def _version(value: bool) -> None:
    if value:
        console.print(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """dicom-node command line."""
    from dicom_node.logging import keep_patient_values_out_of_logs

    keep_patient_values_out_of_logs()  # `serve` sets its own level later


def check_rule_pipelines(settings: Settings) -> None:
    """Refuse to start when a routing rule names a processor that is not installed and
    available, gives it parameters it does not take, or names one that takes no 2-D image
    while matching only 2-D modalities (``ConfigError`` naming the rule)."""
    if not settings.rules:
        return
    from dicom_node import model_registry
    from dicom_node.config import check_rules_against_plugins
    from processors import registry

    usable = [info for info in registry.discover() if info.available and info.processor]
    if model_registry.rules_name_models(settings):
        usable += model_registry.plugins_in_database(settings)
    check_rules_against_plugins(
        settings,
        [info.name for info in usable],
        {info.name: info.processor.Params for info in usable if info.processor},
        {info.name: info.accepts for info in usable},
    )


def check_device(device: str, setting: str) -> None:
    """Refuse a device this machine cannot use: a misspelling, or a CUDA device CuPy does
    not see (no CuPy, no GPU, no such index), as ``BackendError`` naming ``setting``.
    Selects no device, and leaves CUDA alone for ``auto``: the run decides."""
    from processors.devices import BackendError, parse_device

    try:
        kind, _index = parse_device(device)
        if kind == "cuda":
            from processors.backend import resolve

            resolve(device)
    except BackendError as exc:
        raise BackendError(f"{setting}: {exc}") from exc


def refuse_unusable_device(settings: Settings) -> None:
    """The jobs of an inline executor or of the embedded Dask cluster run on this machine:
    refuse a ``processing_device`` it cannot use. A remote cluster's workers have their own."""
    if settings.executor == "dask" and settings.scheduler_address:
        return
    check_device(settings.processing_device, "processing_device")


def make_output_folder(folder: Path) -> None:
    """Create the output folder (and its parents) before any work, or say why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot make the output folder {folder}: {exc.strerror}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write to the output folder {folder}")


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: receive over DICOM, index, detect complete studies. Stops on SIGTERM/SIGINT."""
    from dicom_node.logging import configure_logging
    from dicom_node.receiver_pool import StopFlag, start_receivers
    from dicom_node.security.crypto import load_keys

    settings = settings_from(config)
    refuse_unusable_device(settings)
    check_rule_pipelines(settings)
    load_keys(settings.spool_encryption_key_file)  # a bad key file stops serve here
    configure_logging(settings.log_level, settings.log_format)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.handler)
    signal.signal(signal.SIGINT, stop.handler)
    try:
        receivers = start_receivers(settings)
    except OSError as exc:  # the port in use, the data folder not writable
        raise OperationFailedError(f"cannot start the node: {exc}") from exc
    from dicom_node.node import Node  # the database and processing code: receivers are up

    node = Node(settings, receivers)
    try:
        node.start()
    except BaseException as exc:
        node.stop(grace_seconds=0)
        if isinstance(exc, OSError):
            raise OperationFailedError(f"cannot start the node: {exc}") from exc
        raise
    forwarder = start_audit_forwarding(settings, node.sessions)
    while not stop.requested:
        time.sleep(0.2)
        node.check_children()
    node.stop()
    if forwarder is not None:
        forwarder.stop()


def _ae_title(value: str) -> str:
    try:
        return validate_ae_title(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


PortArgument = Annotated[int, typer.Argument(min=1, max=65535)]
CallingAETitle = Annotated[
    str, typer.Option("--aet", help="Our (calling) AE title.", callback=_ae_title)
]
CalledAETitle = Annotated[
    str, typer.Option("--aec", help="The peer's AE title.", callback=_ae_title)
]


@app.command()
def echo(
    host: str,
    port: PortArgument,
    calling_ae: CallingAETitle = "DICOMNODE",
    called_ae: CalledAETitle = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Send a C-ECHO to HOST PORT."""
    from dicom_node.scu import echo as send_echo

    context = tls_context(tls, tls_ca, tls_cert, tls_key)
    status = send_echo(
        host, port, calling_ae=calling_ae, called_ae=called_ae, timeout=timeout, tls=context
    )
    if status != 0:
        raise OperationFailedError(f"C-ECHO {host}:{port} failed: status 0x{status:04X}")
    console.print(f"C-ECHO {host}:{port} ({called_ae}): success")


def _parse_destination(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--to")
    return host.strip("[]"), int(port)


@app.command()
def send(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (recursed).", exists=True, readable=True)
    ],
    to: Annotated[str, typer.Option("--to", help="Destination HOST:PORT.")],
    calling_ae: CallingAETitle = "DICOMNODE",
    called_ae: CalledAETitle = "ANY-SCP",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each response.")] = 60.0,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """C-STORE DICOM files to another node; exits non-zero if any instance fails."""
    from dicom_node.scu import SendFile, scan_files
    from dicom_node.scu import send as send_files

    host, port = _parse_destination(to)
    context = tls_context(tls, tls_ca, tls_cert, tls_key)
    files, skipped = scan_files(paths)
    for path, reason in skipped:
        errors.print(f"skipped {path}: {reason}", highlight=False, markup=False, soft_wrap=True)
    if not files:
        raise BadInputError("no DICOM instances found to send")
    with progress_bar("sending") as progress:
        task = progress.add_task("send", total=len(files))

        def advance(_item: SendFile, _status: int | None) -> None:
            progress.advance(task)

        report = send_files(
            files,
            host,
            port,
            calling_ae=calling_ae,
            called_ae=called_ae,
            timeout=timeout,
            on_progress=advance,
            tls=context,
        )
    for path, reason in report.failed:
        errors.print(f"failed {path}: {reason}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"sent {report.sent} of {len(files)} instances to {host}:{port}")
    if report.failed:
        raise OperationFailedError(f"{len(report.failed)} of {len(files)} instances not stored")


def study_rows(settings: Settings) -> list[dict[str, Any]]:
    from dicom_node.queries.paging import EVERYTHING
    from dicom_node.queries.studies import StudyFilters, search_studies

    with database_session(settings) as session:
        found = search_studies(session, StudyFilters(newest_first=False), EVERYTHING).items
        record_phi_read(session, "studies", len(found))
    return [study.model_dump(mode="json") for study in found]


@app.command()
def studies(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List received studies with their instance counts and status."""
    rows = study_rows(settings_from(config))
    if printed_as_json_or_empty(rows, as_json, "no studies received yet"):
        return
    table = new_table(
        "STATUS",
        "SERIES",
        "INSTANCES",
        "LAST RECEIVED (UTC)",
        "STUDY",
        numeric=("SERIES", "INSTANCES"),
    )
    for row in rows:
        add_row(
            table,
            "purged" if row["purged_at"] else row["status"],
            row["num_series"],
            row["num_instances"],
            row["last_received_at"][:19],
            row["study_instance_uid"],
        )
    print_table(table)


@app.command()
def generate(
    output: Annotated[Path, typer.Argument(help="Folder to write the series into.")],
    modality: Annotated[str, typer.Option(help="CT or MR.")] = "CT",
    slices: Annotated[int, typer.Option(min=1, max=2000)] = 40,
    size: Annotated[int, typer.Option(help="Rows and columns.", min=16, max=2048)] = 512,
) -> None:
    """Write a synthetic phantom series (known anatomy, valid UIDs) for testing a connection."""
    from dicom_node.synthetic import generate_series

    if modality not in ("CT", "MR"):
        raise typer.BadParameter("CT or MR", param_hint="--modality")
    make_output_folder(output)
    series = generate_series(modality=modality, num_slices=slices, rows=size, columns=size)
    paths = series.write(output)
    console.print(f"wrote {len(paths)} {modality} slices to {output}")


@app.command()
def process(
    input_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder of DICOM files (recursed).", exists=True, file_okay=False, readable=True
        ),
    ],
    pipeline: Annotated[
        str, typer.Option("--pipeline", "-p", help="Processor names, comma-separated.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the outputs.")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", help="PROCESSOR.KEY=VALUE (VALUE as JSON, else a string); repeatable."
        ),
    ] = None,
    uid_root: Annotated[
        str | None, typer.Option(help="UID root for the outputs (default: 2.25 derivation).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, auto or cuda:N.")] = "cpu",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Settings file: record the outputs in its database.",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run a pipeline on a folder of DICOM files, offline; write SEG / SR / derived series.

    The database is written only with --config (the outputs table); without it, no database.
    """
    from dicom_node.outputs import record_outputs
    from dicom_node.process import build_steps, parse_params, parse_pipeline, process_directory

    settings = settings_from(config) if config is not None else None
    check_device(device, "--device")
    names = parse_pipeline(pipeline)
    steps = build_steps(names, params=parse_params(param or []), uid_root=uid_root)
    make_output_folder(output)
    with progress_bar("processing") as progress:
        task = progress.add_task("process", total=None)

        def advance(_series: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = process_directory(input_dir, output, steps, device=device, on_series=advance)
    for what, reason in report.skipped:
        errors.print(f"skipped {what}: {reason}", highlight=False, markup=False, soft_wrap=True)
    if settings is not None:
        record_outputs(settings.effective_database_url, report.outputs)
    kinds = sorted({record.kind for record in report.outputs})
    console.print(
        f"processed {len(report.processed)} series: {len(report.outputs)} instances "
        f"({', '.join(kinds) or 'none'}) in {output}",
        highlight=False,
        soft_wrap=True,
    )


exports_app = typer.Typer(
    help="Exports to destinations: list, retry, cancel.", cls=OneLineErrorGroup
)
app.add_typer(exports_app, name="exports")
exports_app.command("cancel")(exports_cancel)
app.command("replay")(replay)
app.command("nodes")(nodes)
app.command("retention")(retention)


def export_rows(settings: Settings, state: ExportState | None = None) -> list[dict[str, Any]]:
    from dicom_node.queries.exports import ExportFilters, search_exports
    from dicom_node.queries.paging import EVERYTHING

    with database_session(settings) as session:
        filters = ExportFilters(state=state, newest_first=False)
        found = search_exports(session, filters, EVERYTHING).items
        record_phi_read(session, "exports", len(found))
    return [export.model_dump(mode="json") for export in found]


@exports_app.callback(invoke_without_command=True)
def exports(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    state: Annotated[ExportState | None, typer.Option(help="Only exports in this state.")] = None,
) -> None:
    """List exports (one per destination and instance) with their state and attempts."""
    if ctx.invoked_subcommand is not None:
        return
    rows = export_rows(settings_from(config), state)
    empty = f"no {state.value} exports" if state else "no exports yet"
    if printed_as_json_or_empty(rows, as_json, empty):
        return
    table = new_table("ID", "STATE", "TRIES", "DESTINATION", "INSTANCE", "ERROR", numeric=("ID",))
    for row in rows:
        error = row["last_error"] if row["state"] != "delivered" else None
        add_row(
            table,
            row["id"],
            row["state"],
            f"{row['attempts']}/{row['max_attempts']}",
            row["destination"],
            row["sop_instance_uid"],
            error or "",
        )
    print_table(table)


@exports_app.command("retry")
def exports_retry(
    export_id: Annotated[int, typer.Argument(metavar="ID", help="The export's id.")],
    config: ConfigOption = None,
) -> None:
    """Put an export back to pending, due now (attempts kept: a failed one gets one more)."""
    from dicom_node.export import retry

    with database_session(settings_from(config)) as session:
        row = retry(session, export_id)
        if row is None:
            raise BadInputError(f"no export with id {export_id}")
        attempts = row.attempts
    console.print(
        f"export {export_id} is pending again (attempts so far: {attempts})", highlight=False
    )


jobs_app = typer.Typer(help="Processing jobs: list, retry, cancel.", cls=OneLineErrorGroup)
app.add_typer(jobs_app, name="jobs")
jobs_app.command("cancel")(jobs_cancel)


def _seconds_between(started_at: str | None, finished_at: str | None) -> float:
    if not (started_at and finished_at):
        return 0.0
    elapsed = dt.datetime.fromisoformat(finished_at) - dt.datetime.fromisoformat(started_at)
    return elapsed.total_seconds()


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state.")] = None,
) -> None:
    """List jobs with their rule, state, attempts, worker, timings and error."""
    if ctx.invoked_subcommand is not None:
        return
    from dicom_node.queries.jobs import JobFilters, search_jobs
    from dicom_node.queries.paging import EVERYTHING

    with database_session(settings_from(config)) as session:
        found = search_jobs(session, JobFilters(state=state, newest_first=False), EVERYTHING)
        rows = [job.model_dump(mode="json") for job in found.items]
        record_phi_read(session, "jobs", len(rows))
    empty = f"no {state.value} jobs" if state else "no jobs yet"
    if printed_as_json_or_empty(rows, as_json, empty):
        return
    table = new_table(
        "ID",
        "STATE",
        "TRIES",
        "SECONDS",
        "OUTPUTS",
        "RULE (PIPELINE)",
        "ERROR",
        numeric=("ID", "SECONDS", "OUTPUTS"),
    )
    for row in rows:
        add_row(
            table,
            row["id"],
            row["state"],
            f"{row['attempts']}/{row['max_attempts']}",
            f"{_seconds_between(row['started_at'], row['finished_at']):.1f}",
            row["outputs"],
            f"{row['rule']} ({' > '.join(row['pipeline'])})",
            row["error"] or "",
        )
    print_table(table)


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="The job's id.")],
    config: ConfigOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also a running job whose node is gone for good.")
    ] = False,
) -> None:
    """Queue a failed (or succeeded) job again; the running node picks it up."""
    from dicom_node.jobs.state import retry

    with database_session(settings_from(config)) as session:
        if retry(session, job_id, force=force) is None:
            raise BadInputError(f"no job with id {job_id}")
    console.print(f"job {job_id} is queued again", highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply all database migrations."""
    from db.session import upgrade

    settings = settings_from(config)
    upgrade(settings.effective_database_url)
    console.print("database is up to date")


if __name__ == "__main__":
    app()
