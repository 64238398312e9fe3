"""The project's documents stand alone: a user who clones the repository has everything
they point to (no `../shared/`, no document that lives outside the repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKDOWN_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
CODE_PATH = re.compile(r"`((?:docs|config|bench|scripts|processors|dicom_node|db|tests)/[\w./-]+)`")
OUTSIDE = re.compile(r"\.\./shared|\bDESIGN\.md\b")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    suffixes = {".md", ".py", ".toml", ".cfg", ".ini", ".txt", ".sh", ""}
    return [ROOT / n for n in names if Path(n).suffix in suffixes and (ROOT / n).is_file()]


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_every_path_a_document_names_exists() -> None:
    missing = []
    for document in documents():
        text = document.read_text()
        for target in MARKDOWN_LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (document.parent / target).exists():
                missing.append(f"{document.relative_to(ROOT)} -> {target}")
        for target in CODE_PATH.findall(text):
            candidate = target.rstrip(".")
            if "*" in candidate or "<" in candidate:
                continue
            if not (ROOT / candidate).exists():
                missing.append(f"{document.relative_to(ROOT)} -> {candidate}")
    assert missing == []


def test_the_readme_links_the_architecture_document() -> None:
    assert "](docs/architecture.md)" in (ROOT / "README.md").read_text()
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for heading in ("## The data flow", "## Modules", "## Contracts between the stages"):
        assert heading in architecture
