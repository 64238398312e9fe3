"""The demo: a scanner's study goes through the node and its results land in a PACS.

Starts a private Orthanc (the Debian package) as the PACS and the node on its embedded
defaults (SQLite, local spool, Dask worker processes) with the rule ``ct-default`` and its
dashboard on a free port; sends a generated CT study with ``dicom-node send``; waits for
the job and the exports; prints what arrived in Orthanc and what the dashboard showed (an
admin token made with ``dicom-node tokens create``); stops both. Everything lives under
``.demo/``. ``scripts/demo_ui.py`` (``make demo-ui``) leaves them running instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.testing import (  # noqa: E402
    NodeProcess,
    OrthancProcess,
    ct_default_config,
    free_port,
    running_orthanc,
    start_node,
    stop_process,
)

WORK = ROOT / ".demo"
SLICES = int(os.environ.get("DEMO_SLICES", "40"))
TIMELINE_LINES = 14
NODE_STOP_SECONDS = 90  # a job still running gets the node's shutdown grace to finish


def cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"dicom-node {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


@contextlib.contextmanager
def demo_node(orthanc: OrthancProcess, http_port: int) -> Iterator[NodeProcess]:
    """The node with the rule ``ct-default`` sending to ``orthanc``, its dashboard on
    ``http_port``; stopped with SIGTERM on the way out."""
    config = WORK / "node.toml"
    config.write_text(ct_default_config(orthanc, WORK / "data", study_quiet_seconds=3.0))
    port = int(os.environ.get("DICOM_NODE_PORT", free_port()))
    print(f"== starting the node: AE DICOMNODE on port {port}, rule ct-default", flush=True)
    node = start_node(
        WORK / "data",
        port=port,
        config=config,
        env={"DICOM_NODE_LOG_FORMAT": "console", "DICOM_NODE_HTTP_PORT": str(http_port)},
    )
    try:
        yield node
    finally:
        print("== stopping the node (SIGTERM)", flush=True)
        code = stop_process(node.process, timeout=NODE_STOP_SECONDS)
        print(f"   node exited with {code}")


def send_study(node: NodeProcess) -> None:
    print("== sending the study with dicom-node send", flush=True)
    target = f"127.0.0.1:{node.port}"
    print(
        cli("send", str(WORK / "study"), "--to", target, "--aec", "DICOMNODE", env=node.env), end=""
    )


def generate_study() -> None:
    print(f"== generating a synthetic CT study ({SLICES} slices of 512x512)", flush=True)
    cli("generate", str(WORK / "study"), "--modality", "CT", "--slices", str(SLICES))


def admin_token(node: NodeProcess, name: str) -> str:
    return cli("tokens", "create", name, "--role", "admin", env=node.env).strip()


class ElementText(HTMLParser):
    """The text of the elements with an id, and the cells of each table row or list item
    in them (a list item is one cell)."""

    VOID = frozenset({"br", "img", "input", "meta", "link", "hr", "col", "source"})

    def __init__(self) -> None:
        super().__init__()
        self.open: list[tuple[str, str | None]] = []
        self.text: dict[str, list[str]] = {}
        self.rows: dict[str, list[list[str]]] = {}

    def _holders(self) -> list[str]:
        return [element_id for _, element_id in self.open if element_id]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        element_id = dict(attrs).get("id")
        if element_id:
            self.text.setdefault(element_id, [])
            self.rows.setdefault(element_id, [])
        if tag in ("tr", "li"):
            for holder in self._holders():
                self.rows[holder].append([])
        self.open.append((tag, element_id))
        if tag in ("td", "th", "li"):
            for holder in self._holders():
                if self.rows[holder]:
                    self.rows[holder][-1].append("")

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        words = " ".join(data.split())
        if not words or any(tag == "button" for tag, _ in self.open):
            return
        in_cell = any(tag in ("td", "th", "li") for tag, _ in self.open)
        for holder in self._holders():
            self.text[holder].append(words)
            if in_cell and self.rows[holder] and self.rows[holder][-1]:
                row = self.rows[holder][-1]
                row[-1] = f"{row[-1]} {words}".strip()

    def of(self, element_id: str) -> str:
        return " ".join(self.text.get(element_id, []))

    def table(self, element_id: str) -> list[dict[str, str]]:
        """The rows of a table under its header row's names."""
        header, *rows = self.rows.get(element_id, [[]])
        return [dict(zip(header, row, strict=False)) for row in rows if len(row) == len(header)]


def dashboard_page(base: str, token: str, path: str) -> ElementText:
    """A dashboard page as a signed-in browser gets it (GET needs no CSRF token)."""
    cookie = {"Cookie": f"dicom_node_session={token}"}
    request = urllib.request.Request(base + path, headers=cookie)  # noqa: S310 (http://127.0.0.1)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the same)
        page = ElementText()
        page.feed(response.read().decode("utf-8"))
    return page


def print_dashboard(base: str, token: str) -> None:
    print(f"== what the dashboard at {base}/ showed (signed in with an admin token):")
    overview = dashboard_page(base, token, "/")
    for tile in ("tile-instances", "tile-studies", "tile-queue", "tile-turnaround"):
        print(f"   overview: {overview.of(tile)}")
    for table in ("jobs-by-state", "exports-by-state"):
        counts = ", ".join(f"{row[0]} {row[1]}" for row in overview.rows[table] if row[1] != "0")
        print(f"   overview: {table.replace('-', ' ')}: {counts or 'none'}")
    print(f"   overview: failures to look at: {overview.of('failures')}")
    for study in dashboard_page(base, token, "/studies").table("studies"):
        uid = study["Study"]
        print(
            f"   studies: {uid} {study['Status']}, {study['Modalities']},"
            f" {study['Series']} series, {study['Instances']} instances"
        )
        timeline = dashboard_page(base, token, f"/studies/{uid}").rows["timeline"]
        moments = [moment for moment in timeline if " step " not in " ".join(moment)]
        shown = moments if len(moments) <= TIMELINE_LINES else moments[: TIMELINE_LINES - 1]
        for moment in shown:
            print(f"     {' '.join(moment)}")
        if len(shown) < len(moments):
            print(f"     … {len(moments) - len(shown)} more, the last: {' '.join(moments[-1])}")
        print(f"     (and {len(timeline) - len(moments)} job steps, listed with the jobs below)")
    for job in dashboard_page(base, token, "/jobs").table("jobs"):
        print(
            f"   jobs: job {job['Job']} {job['State']}, {job['Rule (pipeline)']},"
            f" tries {job['Tries']}, {job['Started']} to {job['Finished']}"
            f"{', error: ' + job['Error'] if job['Error'] else ''}"
        )
        print(f"     steps: {job['Steps']}")


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    generate_study()
    print("== starting Orthanc as the PACS (Debian package, storage in .demo/orthanc)", flush=True)
    http_port = free_port()
    with running_orthanc(WORK / "orthanc") as orthanc, demo_node(orthanc, http_port) as node:
        env = node.env
        send_study(node)
        print("== waiting for the study to complete (3 s quiet) and its job to run", flush=True)

        def finished_jobs() -> list[dict[str, Any]]:
            jobs = json.loads(cli("jobs", "--json", env=env))
            return jobs if jobs and all(j["state"] in ("succeeded", "failed") for j in jobs) else []

        jobs = wait_for("the job", finished_jobs, 600)
        print(cli("jobs", env=env), end="")
        for job in jobs:
            steps = ", ".join(f"{s['step']} {s['seconds']:.2f}s" for s in job["step_timings"])
            print(f"   job {job['id']} steps: {steps}")

        def delivered() -> list[dict[str, Any]]:
            exports = json.loads(cli("exports", "--json", env=env))
            done = exports and all(e["state"] in ("delivered", "failed") for e in exports)
            return exports if done else []

        exports = wait_for("the exports", delivered, 300)
        states: dict[str, int] = {}
        for export in exports:
            states[export["state"]] = states.get(export["state"], 0) + 1
        print(f"== exports to the PACS: {states}")
        print("== what Orthanc holds now (its REST API):")
        for study in orthanc.get_json("/studies?expand"):  # type: ignore[union-attr]
            print(f"   study {study['MainDicomTags'].get('StudyInstanceUID')}")
            for series_id in study["Series"]:
                series: Any = orthanc.get_json(f"/series/{series_id}")
                tags, count = series["MainDicomTags"], len(series["Instances"])
                print(
                    f"     {tags.get('Modality', '?'):<4} {count:>4} instance(s)"
                    f"  {tags.get('SeriesDescription', '')}"
                )
        print_dashboard(f"http://127.0.0.1:{http_port}", admin_token(node, "demo-admin"))
        failed = [j for j in jobs if j["state"] != "succeeded"]
        return 1 if failed or states.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
