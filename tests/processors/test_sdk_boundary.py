"""The plugin SDK does no I/O: no database, no network, no DICOM, no files but model files.

A static scan of every module under ``processors/`` (imports inside functions included):
the SDK and the built-ins get arrays and return arrays (docs/architecture.md, "Contracts"); what the
node stores, sends or reads from the spool happens in ``dicom_node/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import processors

PACKAGE = Path(processors.__file__).parent
ROOT = PACKAGE.parent

FORBIDDEN_IMPORTS = frozenset(
    {
        "db",
        "sqlalchemy",
        "alembic",
        "psycopg",
        "dicom_node",
        "socket",
        "ssl",
        "http",
        "urllib",
        "requests",
        "httpx",
        "pynetdicom",
        "dicomweb_client",
        "pydicom",
        "highdicom",
    }
)
"""Database, the node, the network and DICOM: none of them belongs in a processor."""

MODEL_LOADERS = frozenset(
    {"processors/model.py", "processors/model_manifest.py", "processors/predict.py"}
)
"""The modules whose job is reading model files (ONNX + manifest, ``.skops``)."""

TRAINING_SCRIPTS = frozenset(
    {"processors/models/train_demo_model.py", "processors/models/train_unet.py"}
)
"""Offline tools run by hand to make the shipped models (they write them, and build their
phantoms with ``dicom_node.synthetic``); nothing in the SDK imports them."""

FILE_CALLS = frozenset(
    {
        "open",
        "read_text",
        "read_bytes",
        "write_text",
        "write_bytes",
        "iterdir",
        "glob",
        "rglob",
        "mkdir",
        "unlink",
        "rmdir",
        "touch",
        "fromfile",
        "tofile",
        "loadtxt",
        "savetxt",
        "savez",
        "savez_compressed",
        "InferenceSession",
    }
)
"""Calls that open, read, write or list files, whatever they are called on."""

SERIALIZER_CALLS = frozenset({"load", "save", "dump"})
"""File calls when made on an imported module (``np.load``, ``torch.save``, ``json.dump``)
or imported from one (``from skops.io import load``); ``entry_point.load()`` is no file."""

FILE_MODULES = frozenset({"shutil", "tempfile", "os"})
OS_FILE_CALLS = frozenset(
    {"open", "fdopen", "remove", "unlink", "rename", "replace", "makedirs", "mkdir", "rmdir"}
    | {"listdir", "scandir", "walk"}
)


def _top(module: str) -> str:
    return module.split(".")[0]


def violations(source: str, path: str, *, may_open_files: bool) -> list[str]:
    """What in ``source`` breaks the rule, as ``path:line: why`` lines."""
    tree = ast.parse(source, filename=path)
    modules: dict[str, str] = {}  # local name -> top-level module
    imported_functions: set[str] = set()
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or _top(alias.name)] = _top(alias.name)
                if _top(alias.name) in FORBIDDEN_IMPORTS:
                    found.append(f"{path}:{node.lineno}: imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported_functions.update(alias.asname or alias.name for alias in node.names)
            if _top(node.module) in FORBIDDEN_IMPORTS:
                found.append(f"{path}:{node.lineno}: imports {node.module}")
            if node.module.startswith("processors.models.train_"):
                found.append(f"{path}:{node.lineno}: imports the training script {node.module}")
    if may_open_files:
        return found
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            called, receiver = func.id, None
            on_file = called in FILE_CALLS or (
                called in SERIALIZER_CALLS and called in imported_functions
            )
        elif isinstance(func, ast.Attribute):
            called = func.attr
            receiver = modules.get(func.value.id) if isinstance(func.value, ast.Name) else None
            on_file = (
                called in FILE_CALLS
                or (receiver is not None and called in SERIALIZER_CALLS)
                or (receiver in ("shutil", "tempfile"))
                or (receiver == "os" and called in OS_FILE_CALLS)
            )
        else:
            continue
        if on_file:
            where = f"{receiver}." if receiver in FILE_MODULES else ""
            found.append(f"{path}:{node.lineno}: file access {where}{called}()")
    return found


def sdk_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_covers_the_sdk_and_the_built_ins() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in sdk_modules()}
    assert {"processors/registry.py", "processors/base.py", "processors/denoise.py"} <= names
    assert names >= MODEL_LOADERS | TRAINING_SCRIPTS  # the exceptions still exist


@pytest.mark.parametrize("path", sdk_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_database_network_dicom_or_file_io(path: Path) -> None:
    name = path.relative_to(ROOT).as_posix()
    if name in TRAINING_SCRIPTS:
        return
    source = path.read_text(encoding="utf-8")
    assert violations(source, name, may_open_files=name in MODEL_LOADERS) == []


@pytest.mark.parametrize(
    "source",
    [
        "from sqlalchemy import select",
        "def f():\n    from db.models import PluginState",
        "import dicom_node.volume",
        "import socket",
        "from pynetdicom import AE",
        "import pydicom",
        "from processors.models.train_unet import main",
        "def f(p):\n    return open(p).read()",
        "def f(p):\n    return p.read_text()",
        "def f(p):\n    p.write_bytes(b'')",
        "import numpy as np\ndef f(p):\n    return np.load(p)",
        "from skops.io import load\ndef f(p):\n    return load(p)",
        "import os\ndef f(p):\n    os.remove(p)",
        "import shutil\ndef f(p):\n    shutil.rmtree(p)",
        "import onnxruntime as ort\ndef f(p):\n    return ort.InferenceSession(p)",
    ],
)
def test_the_scan_catches(source: str) -> None:
    assert violations(source, "example.py", may_open_files=False)


@pytest.mark.parametrize(
    "source",
    [
        "import os\nflag = os.environ.get('X')",
        "def f(ep):\n    return ep.load()",
        "import json\ndef f(text):\n    return json.loads(text)",
        "from dataclasses import replace\ndef f(x):\n    return replace(x)",
        "def f(items, x):\n    items.remove(x)",
    ],
)
def test_the_scan_lets_pure_code_be(source: str) -> None:
    assert violations(source, "example.py", may_open_files=False) == []
