"""``dicom-node models``: list, upload, evaluate, enable and disable registered models.

The same registry as ``/api/v1/models`` (``dicom_node.model_registry``): an upload gets
the same checks, a new version is registered disabled, ``enable`` refuses a version
without an evaluation unless ``--force``; every change is audited as done by the OS user
running the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from dicom_node.cli_base import (
    ConfigOption,
    OneLineErrorGroup,
    add_row,
    console,
    database_session,
    new_table,
    print_table,
    printed_as_json_or_empty,
    settings_from,
)
from processors.errors import BadInputError

models_app = typer.Typer(
    name="models",
    help="Models registered by admins: list, upload, evaluate, enable, disable.",
    no_args_is_help=True,
    cls=OneLineErrorGroup,
)

NameArgument = Annotated[str, typer.Argument(metavar="NAME", help="The model's name.")]
VersionOption = Annotated[
    str | None, typer.Option("--version", help="A version (default: the latest uploaded).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]


@models_app.command("list")
def list_command(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Every registered model: its step name, kind, versions and enabled version."""
    from dicom_node.model_registry import list_models

    with database_session(settings_from(config)) as session:
        rows = list_models(session)
    if printed_as_json_or_empty(rows, as_json, "no registered models"):
        return
    table = new_table("STEP", "KIND", "ENABLED", "LATEST", "EVALUATED", "VERSIONS")
    for row in rows:
        add_row(
            table,
            row["step"],
            row["kind"],
            row["enabled_version"] or "-",
            row["latest_version"],
            "yes" if row["evaluated"] else "no",
            ", ".join(row["versions"]),
        )
    print_table(table)


@models_app.command("upload")
def upload_command(
    file: Annotated[Path, typer.Argument(help="The ONNX network, or a .skops model.")],
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", "-m", help="The ONNX network's manifest.json."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Check and register a model version (disabled until enabled)."""
    from dicom_node.model_registry import register_upload, stage_upload
    from dicom_node.security.audit import Actor

    manifest_text = _read(manifest, "--manifest") if manifest is not None else None
    if manifest_text is None and file.suffix != ".skops":
        raise BadInputError("--manifest: an ONNX network needs its manifest (.skops: none)")
    settings = settings_from(config)
    try:
        source = open(file, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise BadInputError(f"{file}: cannot read: {exc.strerror}") from None
    with source, database_session(settings) as session:
        row = register_upload(
            session, settings, stage_upload(source, settings), manifest_text, Actor.os_user()
        )
        name, version = row.name, row.version
    console.print(
        f"registered model:{name} version {version} (disabled: evaluate it, then enable it)",
        highlight=False,
    )


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{option} {path}: cannot read: {exc.strerror}") from None


@models_app.command("evaluate")
def evaluate_command(
    name: NameArgument,
    data: Annotated[
        Path, typer.Option("--data", help="A labelled set: image series + SEG or labels.csv.")
    ],
    version: VersionOption = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Score a model version on a labelled set and keep the figures with it."""
    from dicom_node.model_evaluation import evaluate
    from dicom_node.model_registry import get_version, record_evaluation, version_ref
    from dicom_node.security.audit import Actor

    settings = settings_from(config)
    with database_session(settings) as session:
        row = get_version(session, name, version)
        ref = version_ref(settings, row)
    figures = evaluate(ref, data)
    with database_session(settings) as session:
        record_evaluation(session, ref.name, ref.version, figures, Actor.os_user())
    if as_json:
        print(json.dumps(figures, indent=2))
        return
    for line in summary(figures):
        console.print(line, highlight=False)


def summary(figures: dict[str, Any]) -> list[str]:
    """The evaluation in a few lines."""
    head = f"{figures['model']} {figures['version']}: {figures['cases']} cases"
    lines = [head + (f", {len(figures['skipped'])} skipped" if figures["skipped"] else "")]
    if figures["task"] == "segmentation":
        for label, item in figures["per_label"].items():
            lines.append(
                f"  {label}: Dice {item['dice_pooled']} pooled, "
                f"{item['dice_mean_per_case']} mean per case"
            )
    elif figures["task"] == "regression":
        lines.append(f"  MAE {figures['mae']}, RMSE {figures['rmse']}, R2 {figures['r2']}")
    else:
        for label, item in figures["per_class"].items():
            share = figures["class_balance"][label]["share"]
            lines.append(
                f"  {label} ({item['support']} cases, {share}): precision {item['precision']}, "
                f"recall {item['recall']}, F1 {item['f1']}"
            )
        macro = figures["macro"]
        lines.append(
            f"  macro: precision {macro['precision']}, recall {macro['recall']}, F1 "
            f"{macro['f1']}; accuracy {figures['accuracy']}, balanced accuracy "
            f"{figures['balanced_accuracy']}, ROC AUC {figures['roc_auc']}"
        )
        matrix = figures["confusion_matrix"]
        lines.append(f"  confusion matrix (rows truth, columns predicted): {matrix}")
    for item in figures["skipped"]:
        lines.append(f"  skipped {item['item']}: {item['reason']}")
    return lines


@models_app.command("enable")
def enable_command(
    name: NameArgument,
    version: VersionOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Enable a version that has no evaluation.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Make a version the one rules run as model:NAME."""
    from dicom_node.model_registry import enable
    from dicom_node.security.audit import Actor

    with database_session(settings_from(config)) as session:
        row = enable(session, name, Actor.os_user(), version=version, force=force)
        chosen = row.version
    console.print(f"enabled model:{name} version {chosen}", highlight=False)


@models_app.command("disable")
def disable_command(name: NameArgument, config: ConfigOption = None) -> None:
    """Run no version of the model: jobs naming it fail with the reason."""
    from dicom_node.model_registry import disable
    from dicom_node.security.audit import Actor

    with database_session(settings_from(config)) as session:
        disable(session, name, Actor.os_user())
    console.print(f"disabled model:{name}", highlight=False)
