"""The node on an existing Dask cluster: a real ``dask scheduler`` and two ``dask worker``
processes (one thread each), the node pointed at it with ``scheduler_address``, a real
Orthanc as the destination.

- jobs run on the cluster's workers; a worker lost mid-job (its process killed, or its
  nanny, so the worker is gone for good) sends the job to another worker: the scheduler
  fails the run at once (``allowed-failures`` 0) and the node runs the job again while it
  has attempts left (``job_max_attempts``). (A job that kills every worker it runs on
  fails after its attempts: tests/dicom_node/jobs/test_executors.py.)
- the node killed (SIGKILL) while the cluster runs its jobs, then started again: its runs
  left on the workers are stopped, every job succeeds, every output is in Orthanc once.

A test plugin (``journaled_sleep``) writes a line to a journal when a run starts and when
it ends, so the tests see each run, where it ran and whether it was stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from orchestration_support import (
    orthanc_instances,
    plugin_env,
    wait_for_exports,
    wait_for_jobs,
    write_config,
)

from dicom_node.jobs.executors import JOB_KEY_PREFIX
from dicom_node.synthetic import generate_series
from dicom_node.testing import (
    NodeProcess,
    OrthancProcess,
    free_port,
    running_orthanc,
    start_node,
    stop_process,
    storescu,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

JOURNALED_PLUGIN = '''
"""A processor that sleeps and says so in a journal, for the cluster tests."""
import os
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from processors.base import ImageResult, ProcessorParams


class _Params(ProcessorParams):
    journal: str = ""
    first_seconds: float = Field(default=1.0, ge=0)
    """How long the first run of a series sleeps; later runs sleep ``seconds``."""
    seconds: float = Field(default=0.5, ge=0)


class JournaledSleep:
    name: ClassVar[str] = "journaled_sleep"
    version: ClassVar[str] = "1.0.0"
    family: ClassVar[str] = "denoise"
    Params: ClassVar[type[_Params]] = _Params

    def run(self, volume, params, xp):
        import time

        from distributed import get_worker

        journal = Path(params.journal)
        series = volume.series_instance_uid
        first = not journal.exists() or f"start {series}" not in journal.read_text()
        with journal.open("a") as out:
            out.write(f"start {series} {get_worker().address} {os.getpid()}\\n")
        time.sleep(params.first_seconds if first else params.seconds)
        with journal.open("a") as out:
            out.write(f"end {series} {get_worker().address} {os.getpid()}\\n")
        return [ImageResult(volume, "Copy after a pause")]
'''


def install_journaled_plugin(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "journaled_plugin.py").write_text(JOURNALED_PLUGIN)
    info = directory / "journaled_plugin-1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: journaled-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[dicom_node.processors]\njournaled_sleep = journaled_plugin:JournaledSleep\n"
    )
    return directory


@dataclass
class Run:
    series: str
    worker: str
    ended: bool


def journal_runs(journal: Path) -> list[Run]:
    """The runs in the journal, in the order they started."""
    runs: list[Run] = []
    for line in journal.read_text().splitlines() if journal.exists() else []:
        what, series, worker, pid = line.split()
        if what == "start":
            runs.append(Run(series, f"{worker} {pid}", ended=False))
        else:
            # A worker runs one job at a time: the run of this series it started last.
            [*_, run] = [r for r in runs if (r.series, r.worker) == (series, f"{worker} {pid}")]
            run.ended = True
    return runs


@dataclass
class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes from this environment."""

    root: Path
    environ: dict[str, str]
    address: str = ""
    scheduler: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    client: Any = None

    def start(self, workers: int) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.scheduler = self._spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", str(port)],
            ["--dashboard-address", ":0"],
        )
        from distributed import Client

        self.client = Client(self.address, timeout=60)
        for _ in range(workers):
            self.add_worker()

    def _spawn(self, name: str, command: list[str], options: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}-{time.monotonic_ns()}.log").open("wb")
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "dask", *command, *options],
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )

    def add_worker(self) -> None:
        """One more worker (``--nworkers 1 --nthreads 1``, under a nanny); waits for it."""
        before = len(self.worker_addresses())
        self.workers.append(
            self._spawn(
                "worker",
                ["worker", self.address, "--nworkers", "1", "--nthreads", "1"],
                ["--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GiB"],
            )
        )
        self.client.wait_for_workers(before + 1, timeout=90)

    def worker_addresses(self) -> set[str]:
        return set(self.client.scheduler_info(n_workers=-1)["workers"])

    def ensure_workers(self, count: int) -> None:
        """Wait for restarting workers; start new ones for those whose nanny was killed."""
        alive = [p for p in self.workers if p.poll() is None]
        for _ in range(count - len(alive)):
            self.add_worker()
        self.client.wait_for_workers(count, timeout=90)

    def running_jobs(self) -> dict[str, str]:
        """Worker address -> the job key it runs."""
        return {
            worker: key
            for worker, keys in self.client.processing().items()
            for key in keys
            if str(key).startswith(JOB_KEY_PREFIX)
        }

    def kill_worker_process(self, address: str) -> None:
        """SIGKILL the worker process; its nanny starts a new one."""
        [pid] = self.client.run(os.getpid, workers=[address]).values()
        os.kill(pid, signal.SIGKILL)

    def kill_nanny(self, address: str) -> None:
        """SIGKILL the ``dask worker`` process (the nanny); the worker goes with it."""
        [nanny] = self.client.run(os.getppid, workers=[address]).values()
        [process] = [p for p in self.workers if p.pid == nanny]
        process.kill()
        process.wait()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for process in [*self.workers, *([self.scheduler] if self.scheduler else [])]:
            if process.poll() is None:
                stop_process(process)


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment that gives the node and the workers the test plugins."""
    return plugin_env(install_journaled_plugin(tmp_path_factory.mktemp("plugins")))


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, plugins: dict[str, str]
) -> Iterator[DaskCluster]:
    root = tmp_path_factory.mktemp("cluster")
    environ = {
        **{key: value for key, value in os.environ.items() if not key.startswith("DASK_")},
        **plugins,
        # docs/operations.md: a job that kills its worker is not handed to the next one.
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
        "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    }
    dask_cluster = DaskCluster(root, environ)
    try:
        dask_cluster.start(workers=2)
        yield dask_cluster
    finally:
        dask_cluster.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancProcess]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def cluster_node_config(
    tmp_path: Path, orthanc: OrthancProcess, cluster: DaskCluster, first_seconds: float
) -> Path:
    journal = tmp_path / "journal.txt"
    rules = f"""
[[rules]]
name = "journaled"
match = {{ SeriesDescription = "journaled" }}
pipeline = ["journaled_sleep"]
params = {{ journaled_sleep = {{ journal = "{journal}", first_seconds = {first_seconds} }} }}
destinations = ["pacs"]
"""
    return write_config(
        tmp_path / "node.toml",
        orthanc,
        rules,
        scheduler_address=cluster.address,
        study_quiet_seconds=1.0,
        receiver_processes=1,
        job_max_attempts=2,
    )


def node_with_two_runs_on(
    cluster: DaskCluster, tmp_path: Path, orthanc: OrthancProcess, plugins: dict[str, str]
) -> tuple[NodeProcess, Path]:
    """A node on ``cluster`` (its config) once the cluster's two workers run its two jobs,
    each in the first run of its series (which sleeps a minute)."""
    cluster.ensure_workers(2)
    config = cluster_node_config(tmp_path, orthanc, cluster, first_seconds=60.0)
    node = start_node(tmp_path / "data", config=config, env=plugins, timeout=90)
    try:
        for name in ("one", "two"):
            series = generate_series(
                num_slices=6, rows=64, columns=64, uid_seed=name, series_description="journaled"
            )
            storescu(series.write(tmp_path / name), node.port, called_ae="DICOMNODE")
        wait_until("both jobs running", lambda: len(cluster.running_jobs()) == 2)
        wait_until("both runs started", lambda: len(journal_runs(tmp_path / "journal.txt")) == 2)
    except BaseException:
        node.stop()
        raise
    return node, config


def wait_until(what: str, condition: Any, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def assert_each_output_once_in(orthanc: OrthancProcess, node: NodeProcess, jobs: list[Any]) -> None:
    exports = wait_for_exports(node, timeout=90)
    assert {e["state"] for e in exports} == {"delivered"}
    outputs = {e["sop_instance_uid"] for e in exports}
    assert len(exports) == len(outputs) == sum(job["outputs"] for job in jobs) > 0
    assert set(orthanc_instances(orthanc)) == outputs
    assert orthanc.get_json("/statistics")["CountInstances"] == len(outputs)  # type: ignore[index]


def test_jobs_run_on_the_cluster_and_a_lost_worker_sends_its_job_to_another(
    tmp_path: Path, orthanc: OrthancProcess, cluster: DaskCluster, plugins: dict[str, str]
) -> None:
    node, _ = node_with_two_runs_on(cluster, tmp_path, orthanc, plugins)
    try:
        assert '"embedded": false' in node.log()  # no cluster of its own
        by_process, by_nanny = sorted(cluster.running_jobs())
        cluster.kill_worker_process(by_process)
        cluster.kill_nanny(by_nanny)

        jobs = wait_for_jobs(node, 2, ("succeeded", "failed"), 120)
        assert [(job["state"], job["attempts"]) for job in jobs] == [("succeeded", 2)] * 2, jobs
        # Each ran again on a worker of the cluster, none on the one that is gone.
        alive = cluster.worker_addresses()
        assert {job["worker"] for job in jobs} <= alive and by_nanny not in alive
        runs = journal_runs(tmp_path / "journal.txt")
        assert [r.ended for r in runs] == [False, False, True, True]
        assert_each_output_once_in(orthanc, node, jobs)
    finally:
        node.stop()


def test_the_node_killed_while_the_cluster_runs_its_jobs_loses_and_repeats_nothing(
    tmp_path: Path, orthanc: OrthancProcess, cluster: DaskCluster, plugins: dict[str, str]
) -> None:
    node, config = node_with_two_runs_on(cluster, tmp_path, orthanc, plugins)
    try:
        node.kill()  # SIGKILL while both runs go on on the cluster
        node = start_node(
            tmp_path / "data", config=config, env=plugins, port=node.port, timeout=120
        )

        jobs = wait_for_jobs(node, 2, ("succeeded", "failed"), 120)
        assert [(job["state"], job["attempts"]) for job in jobs] == [("succeeded", 2)] * 2, jobs
        # The runs left by the killed node were stopped when it started again (they
        # never ended); then each job ran once more.
        runs = journal_runs(tmp_path / "journal.txt")
        assert [r.ended for r in runs] == [False, False, True, True], runs
        assert sorted(r.series for r in runs[:2]) == sorted(r.series for r in runs[2:])
        assert_each_output_once_in(orthanc, node, jobs)
    finally:
        node.stop()
