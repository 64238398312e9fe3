"""What every ``dicom-node`` command shares: errors as one line and an exit code, the
settings option, the consoles, tables.

Errors are caught once, in ``OneLineErrorGroup``, the class of the app and of every sub-app:
an error raised on purpose (``processors.errors.DicomNodeError``) or a usage error ends the
command with ``error: <message>`` on stderr and exit code 2 for bad input, 1 for a
failure; so does an ``OSError`` (a full disk, a lost mount: exit 1). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from dicom_node.config import DEFAULT_CONFIG_PATH, Settings, load_settings
from processors.errors import BadInputError, DicomNodeError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# Piped output is as wide as its rows, so that no UID is folded or cut.
PIPED_WIDTH = 10_000

console = Console()
errors = Console(stderr=True)


def print_error(message: str) -> None:
    """``error: message`` on stderr, on one line whatever the message or the terminal."""
    one_line = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    errors.print(Text.assemble(("error:", "bold red"), " ", one_line), soft_wrap=True)


def exit_code_for(error: DicomNodeError) -> int:
    return EXIT_BAD_INPUT if isinstance(error, BadInputError) else EXIT_FAILED


# Typer (0.26 on) carries a copy of click of its own and exports BadParameter alone of its
# errors; the usage errors it raises (unknown option, bad value...) share BadParameter's base.
UsageError: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError"
)


def _usage_message(error: Exception) -> str:
    message: str = getattr(error, "format_message", lambda: str(error))()
    context = getattr(error, "ctx", None)
    return f"{message} (see '{context.command_path} --help')" if context is not None else message


@contextlib.contextmanager
def errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            raise  # a group named without a subcommand: typer shows its help
        print_error(_usage_message(exc))
        raise typer.Exit(getattr(exc, "exit_code", EXIT_BAD_INPUT)) from exc
    except DicomNodeError as exc:
        print_error(str(exc))
        raise typer.Exit(exit_code_for(exc)) from exc
    except OSError as exc:  # the machine, not the request: a full disk, a lost mount
        print_error(describe_os_error(exc))
        raise typer.Exit(EXIT_FAILED) from exc


def describe_os_error(error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason}: {error.filename}" if error.filename else reason


class OneLineErrorGroup(TyperGroup):
    """A command group whose commands end an error raised on purpose, or a usage error,
    with one line on stderr and an exit code (see the module's docstring).

    The contexts are typed ``Any``: typer has no public name for its copy of click's."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        with errors_as_one_line():  # the group's own options
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with errors_as_one_line():  # the subcommand: its options and its run
            return super().invoke(ctx)


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"TOML settings file (default: {DEFAULT_CONFIG_PATH} when it exists).",
        dir_okay=False,
    ),
]


def settings_from(config: Path | None) -> Settings:
    """The settings from ``config`` (or the default file when it exists) and the
    environment; a bad value raises ``ConfigError`` naming the key."""
    if config is None and DEFAULT_CONFIG_PATH.is_file():
        config = DEFAULT_CONFIG_PATH
    return load_settings(config)


@contextlib.contextmanager
def database_session(settings: Settings) -> Iterator[Session]:
    """A session on the node's database (migrated first), committed on success."""
    from db.session import migrated_session

    with migrated_session(settings.effective_database_url) as session:
        yield session


def printed_as_json_or_empty(rows: Sequence[dict[str, Any]], as_json: bool, empty: str) -> bool:
    """Print ``rows`` as JSON, or say ``empty`` when there are none; False: print a table."""
    if as_json:
        print(json.dumps(list(rows), indent=2))
        return True
    if not rows:
        console.print(empty)
        return True
    return False


def new_table(*columns: str, numeric: Sequence[str] = ()) -> Table:
    """A table with these column headers; the ``numeric`` ones are right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for column in columns:
        justify: JustifyMethod = "right" if column in numeric else "left"
        table.add_column(column, justify=justify, overflow="fold")  # never cut a UID or a name
    return table


def add_row(table: Table, *values: object) -> None:
    """A row of plain text (no rich markup read from the values)."""
    table.add_row(*(Text(str(value)) for value in values))


def print_table(table: Table) -> None:
    """On a terminal, fitted to its width; piped or redirected, nothing folded or cut."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(width=PIPED_WIDTH, highlight=False).print(table)
