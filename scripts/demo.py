"""The demo: a scanner's study goes through the node and its results land in a PACS.

Starts a private Orthanc (the Debian package) as the PACS and the node on its embedded
defaults (SQLite, local spool, Dask worker processes) with the rule ``ct-default``;
sends a generated CT study with ``dicom-node send``; waits for the job and the exports;
prints what arrived in Orthanc; stops both. Everything lives under ``.demo/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.testing import (  # noqa: E402
    ct_default_config,
    free_port,
    running_orthanc,
    start_node,
)

WORK = ROOT / ".demo"
SLICES = int(os.environ.get("DEMO_SLICES", "40"))


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


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    print(f"== generating a synthetic CT study ({SLICES} slices of 512x512)", flush=True)
    cli("generate", str(WORK / "study"), "--modality", "CT", "--slices", str(SLICES))
    print("== starting Orthanc as the PACS (Debian package, storage in .demo/orthanc)", flush=True)
    with running_orthanc(WORK / "orthanc") as orthanc:
        config = WORK / "node.toml"
        config.write_text(ct_default_config(orthanc, WORK / "data", study_quiet_seconds=3.0))
        port = int(os.environ.get("DICOM_NODE_PORT", free_port()))
        print(f"== starting the node: AE DICOMNODE on port {port}, rule ct-default", flush=True)
        node = start_node(
            WORK / "data", port=port, config=config, env={"DICOM_NODE_LOG_FORMAT": "console"}
        )
        env = node.env
        try:
            print("== sending the study with dicom-node send", flush=True)
            print(
                cli(
                    "send",
                    str(WORK / "study"),
                    "--to",
                    f"127.0.0.1:{port}",
                    "--aec",
                    "DICOMNODE",
                    env=env,
                ),
                end="",
            )
            print("== waiting for the study to complete (3 s quiet) and its job to run", flush=True)

            def finished_jobs() -> list[dict[str, Any]]:
                jobs = json.loads(cli("jobs", "--json", env=env))
                return (
                    jobs
                    if jobs and all(j["state"] in ("succeeded", "failed") for j in jobs)
                    else []
                )

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
            failed = [j for j in jobs if j["state"] != "succeeded"]
            return 1 if failed or states.get("failed") else 0
        finally:
            print("== stopping the node (SIGTERM)", flush=True)
            code = node.stop()
            print(f"   node exited with {code}")


if __name__ == "__main__":
    raise SystemExit(main())
