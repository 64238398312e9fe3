"""Two real nodes on one PostgreSQL database and one shared data folder, exporting to a
real Orthanc: a study whose instances are split between them completes once and is
processed once; the node running a job is killed (kill -9) and the other takes the job
over by itself once the lease runs out, with the attempt counted, and sends its outputs
once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gated_plugin import gated_plugin_env, gated_rule
from node_rows import exports, jobs, node_sessions, wait_until
from orchestration_support import orthanc_instances, write_config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, ExportState, Job, JobState, StudyEvent, StudyEventKind
from dicom_node.synthetic import generate_series
from dicom_node.testing import (
    NodeProcess,
    OrthancProcess,
    dcmtk_env,
    require_tool,
    running_orthanc,
    start_node,
    storescu,
)
from dicom_node.testing_postgres import running_postgres
from tests.db.conftest import new_postgres_database

pytestmark = [pytest.mark.interop, pytest.mark.postgres, pytest.mark.slow]

LEASE_SECONDS = 4


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    with running_postgres() as url:
        yield url


def send(files: list[Path], node: NodeProcess) -> subprocess.Popen[str]:
    """storescu of ``files`` to ``node``, in the background."""
    command = [require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)]
    return subprocess.Popen(
        [*command, *map(str, files)],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def completions(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return (
            session.scalar(
                select(func.count(StudyEvent.id)).where(StudyEvent.event == StudyEventKind.COMPLETE)
            )
            or 0
        )


def delivered(count: int) -> Callable[[list[Export]], bool]:
    def check(found: list[Export]) -> bool:
        return len(found) == count and all(e.state is ExportState.DELIVERED for e in found)

    return check


def test_two_nodes_share_studies_and_one_takes_over_the_job_of_the_other_killed(
    tmp_path: Path, orthanc: OrthancProcess, postgres_server: str
) -> None:
    database_url = new_postgres_database(postgres_server)
    gate = tmp_path / "gate"
    data_dir = tmp_path / "shared" / "data"  # one data folder for both nodes
    config = write_config(
        tmp_path / "node.toml",
        orthanc,
        gated_rule(gate),
        study_quiet_seconds=3.0,  # the two halves of the split study arrive well within it
        executor="inline",
        job_max_attempts=3,  # a take-over costs one (a job out of attempts fails instead)
        receiver_processes=1,
        node_heartbeat_seconds=1,
        node_lease_seconds=LEASE_SECONDS,
    )
    plugins = gated_plugin_env(tmp_path / "plugins")

    def node_env(name: str) -> dict[str, str]:
        return {**plugins, "DICOM_NODE_DATABASE_URL": database_url, "DICOM_NODE_NODE_NAME": name}

    nodes = {"node-a": start_node(data_dir, config=config, env=node_env("node-a"))}
    nodes["node-b"] = start_node(data_dir, config=config, env=node_env("node-b"))
    try:
        with node_sessions(database_url) as sessions:
            # A study split between the two nodes: completed once, one job, run once.
            gate.touch()
            split = generate_series(num_slices=6, rows=32, columns=32, uid_seed="split").write(
                tmp_path / "split"
            )
            senders = [send(split[:3], nodes["node-a"]), send(split[3:], nodes["node-b"])]
            assert [s.wait(60) for s in senders] == [0, 0], [s.stderr.read() for s in senders]  # type: ignore[union-attr]
            [job] = wait_until(lambda: jobs(sessions), succeeded, "the split study's job")
            assert (job.attempts, job.num_outputs) == (1, 6)
            wait_until(lambda: exports(sessions), delivered(6), "its outputs delivered")
            assert completions(sessions) == 1

            # The node that runs the next job is killed mid-job; the other takes it over.
            gate.unlink()
            files = generate_series(num_slices=4, rows=32, columns=32, uid_seed="taken").write(
                tmp_path / "taken"
            )
            assert storescu(files, nodes["node-a"].port, called_ae="DICOMNODE").returncode == 0
            found = wait_until(lambda: jobs(sessions), second_job_running, "the job runs")
            victim = found[1].claimed_by
            assert victim in nodes
            nodes.pop(victim).kill()  # SIGKILL: no clean-up, no last heartbeat
            gate.touch()
            [survivor_name] = nodes
            done = wait_until(
                lambda: jobs(sessions), lambda js: succeeded(js[1:]), "taken over", 120
            )
            taken = done[1]
            assert (taken.claimed_by, taken.attempts) == (survivor_name, 2)
            sent = wait_until(lambda: exports(sessions), delivered(6 + 4), "all delivered")
        uids = {e.sop_instance_uid for e in sent}
        assert len(uids) == len(sent) and set(orthanc_instances(orthanc)) == uids
        assert orthanc.get_json("/statistics")["CountInstances"] == 10  # type: ignore[index]

        listed = nodes_json(nodes[survivor_name], config)
        assert {row["name"]: row["state"] for row in listed} == {
            victim: "silent",
            survivor_name: "running",
        }
        assert "took over the work of a silent node" in nodes[survivor_name].log()
    finally:
        for node in nodes.values():
            node.stop()


def succeeded(found: list[Job]) -> bool:
    return len(found) == 1 and found[0].state is JobState.SUCCEEDED


def second_job_running(found: list[Job]) -> bool:
    return len(found) == 2 and found[1].state is JobState.RUNNING


def nodes_json(node: NodeProcess, config: Path) -> list[dict[str, object]]:
    """``dicom-node nodes --json`` as an operator of ``node`` runs it (its lease setting)."""
    result = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "nodes", "--json", "--config", str(config)],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed
