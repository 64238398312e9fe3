"""A throw-away PostgreSQL server (Debian's `postgresql` package) for tests and benchmarks."""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dicom_node.testing import ToolMissingError, free_port, wait_for_port


def postgres_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not candidates:
        raise ToolMissingError(
            "PostgreSQL is not installed; run `make deps` (apt-get install postgresql)"
        )
    return Path(candidates[0]).parent


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: drop to the `postgres` system user."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise ToolMissingError("runuser is needed to start PostgreSQL as root")
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a private server on a free loopback port; yield a SQLAlchemy URL."""
    bin_dir = postgres_bin_dir()
    prefix = _as_postgres_user()
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    data = root / "data"
    if prefix:
        shutil.chown(root, "postgres", "postgres")
        root.chmod(0o700)
    port = free_port()
    subprocess.run(
        [
            *prefix,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        [
            *prefix,
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(root),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=50",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 60, server)
        create = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        create += ["-c", "CREATE DATABASE dicomnode"]
        # The port opens before the server accepts sessions ("the database system is
        # starting up"): try again for a while.
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run(create, capture_output=True, text=True)
            if result.returncode == 0:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"PostgreSQL did not start: {result.stderr.strip()}")
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/dicomnode"
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)


_shared_lock = threading.Lock()
_shared_server: list[str] = []  # the URL of this process's shared server, once started


def shared_postgres_server() -> str:
    """The URL of this process's one shared server (its first database), started on first
    use and stopped when the process exits: tests take a fresh database on it
    (``new_database``) instead of an ``initdb`` each."""
    with _shared_lock:
        if not _shared_server:
            stack = contextlib.ExitStack()
            _shared_server.append(stack.enter_context(running_postgres()))
            atexit.register(stack.close)
        return _shared_server[0]


def new_database(server_url: str) -> str:
    """A new, empty database on the server of ``server_url``; returns its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def fresh_postgres_database() -> str:
    """The URL of a new, empty database on the shared server (``shared_postgres_server``)."""
    return new_database(shared_postgres_server())
