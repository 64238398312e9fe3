"""``dicom-node retention``: run one retention pass now (or show what it would delete)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dicom_node.cli_base import (
    ConfigOption,
    add_row,
    console,
    new_table,
    print_table,
    settings_from,
)


def _size(count: int) -> str:
    return f"{count / 1024**2:.1f} MiB" if count >= 1024**2 else f"{count} bytes"


def retention(
    config: ConfigOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only show what would be deleted.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete the spool files of done studies and the outputs of done jobs, by the
    retention settings (age, delivered and committed, the disk watermark); the rows stay,
    marked purged."""
    from db.session import make_engine, make_sessionmaker, upgrade
    from dicom_node.logging import configure_logging
    from dicom_node.retention import run_retention

    settings = settings_from(config)
    configure_logging(settings.log_level, settings.log_format)  # on stderr
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    try:
        report = run_retention(make_sessionmaker(engine), settings, dry_run=dry_run)
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    if report.purged:
        table = new_table(
            "WHAT", "REASON", "FILES", "SIZE", "DONE (UTC)", "STUDY", "JOB", numeric=("FILES",)
        )
        for item in report.purged:
            add_row(
                table,
                "spool" if item.kind == "study" else "outputs",
                item.reason,
                item.files,
                _size(item.bytes),
                item.done_at.isoformat()[:19],
                item.study_instance_uid,
                item.job_id or "",
            )
        print_table(table)
    studies = sum(1 for item in report.purged if item.kind == "study")
    jobs = len(report.purged) - studies
    console.print(
        f"{verb} the files of {studies} studies and the outputs of {jobs} jobs:"
        f" {_size(report.bytes_freed)}; {_size(report.free_bytes_after)} free",
        highlight=False,
    )
