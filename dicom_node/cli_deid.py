"""``dicom-node deidentify IN -o OUT``: PS3.15 Basic Profile de-identification of files.

IN is a file or a folder (recursed; any file name, with or without a preamble). Each
instance is written as ``OUT/<study>/<series>/<instance>.dcm`` under its pseudonymous
UIDs. With ``--key-file`` (the node's key file) the pseudonyms are those the node itself
would give; without it a random key is used and a second run gives other pseudonyms.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from dicom_node.cli_base import console, errors
from dicom_node.security.deid_options import DeidOption
from processors.errors import BadInputError


class Profile(StrEnum):
    BASIC = "basic"


def _note(message: str) -> None:
    errors.print(message, highlight=False, markup=False, soft_wrap=True)


def deidentify(
    source: Annotated[
        Path, typer.Argument(metavar="IN", help="A DICOM file or a folder (recursed).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the output.")],
    profile: Annotated[Profile, typer.Option(help="The confidentiality profile.")] = Profile.BASIC,
    option: Annotated[
        list[DeidOption] | None,
        typer.Option("--option", help="A profile option (PS3.15 Table E.1-1); repeatable."),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(help="Key file (openssl rand -base64 32): repeatable pseudonyms."),
    ] = None,
    allow_burned_in: Annotated[
        bool,
        typer.Option(help="Also images that may show text burned into their pixels."),
    ] = False,
) -> None:
    """De-identify DICOM files (PS3.15 Annex E Basic Application Level Confidentiality Profile)."""
    from pydicom import dcmread

    from dicom_node.cli import make_output_folder
    from dicom_node.scu import scan_files
    from dicom_node.security.deid import (
        BurnedInAnnotationError,
        Deidentifier,
        DeidProfile,
        secret_from,
    )
    from dicom_node.security.keys import KeyRing

    if not source.exists():
        raise BadInputError(f"no such file or folder: {source}")
    deid_profile = DeidProfile(frozenset(option or ()), allow_burned_in=allow_burned_in)
    keys = KeyRing.from_file(key_file) if key_file is not None else KeyRing.generate()
    deidentifier = Deidentifier(secret_from(keys), deid_profile)
    files, skipped = scan_files([source])
    for path, reason in skipped:
        _note(f"skipped {path}: {reason}")
    if not files:
        raise BadInputError(f"no DICOM instances found in {source}")
    make_output_folder(output)
    refused: list[Path] = []
    written = 0
    for item in files:
        ds = dcmread(item.path, force=True)
        try:
            deidentifier.deidentify(ds)
        except BurnedInAnnotationError:
            refused.append(item.path)
            _note(f"refused {item.path}: it may show text burned into its pixels")
            continue
        target = output / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        written += 1
    if key_file is None:
        _note("no --key-file: a random key was used, another run gives other pseudonyms")
    console.print(
        f"de-identified {written} of {len(files)} instances into {output}"
        f" (PS3.15 {deidentifier.table.edition} {profile.value} profile)",
        highlight=False,
        soft_wrap=True,
    )
    if refused:
        raise BadInputError(
            f"{len(refused)} instances refused: they may show text burned into their pixels"
            " (check them, then --allow-burned-in)"
        )
