"""A study that completes again while its job runs: the job runs again once the run ends,
on the whole series, never twice at once (the dispatcher with the inline executor)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, Job, JobState, Output, OutputKind
from dicom_node.assembler import complete_quiet_studies
from dicom_node.config import load_settings
from dicom_node.jobs.dispatcher import Dispatcher, job_output_dir
from dicom_node.jobs.executors import InlineExecutor
from dicom_node.jobs.state import cancel, claim_next
from dicom_node.jobs.worker import JobResult, JobSpec, run_job
from dicom_node.routing_store import sync_from_settings
from dicom_node.security.audit import Actor
from dicom_node.storage import Spool
from tests.dicom_node import test_routing
from tests.dicom_node.jobs.test_state import CT_RULE, LATER, jobs, settings_sending_to_pacs
from tests.dicom_node.test_routing import NOW, add_series

sessions = test_routing.sessions
spool = test_routing.spool


def started_run(
    sessions: sessionmaker[Session], spool: Spool, dispatcher: Dispatcher, slices: int
) -> Job:
    """The study completes with ``slices`` slices; its job is claimed and runs (inline:
    its result is ready, not yet collected)."""
    add_series(spool, sessions, number=1, num_slices=slices)
    with sessions.begin() as session:
        sync_from_settings(session, dispatcher.settings)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher.reload_routing(force=True)
    assert dispatcher.route_completed_studies() == 1
    assert dispatcher.fill() == 1
    [job] = jobs(sessions)
    assert job.state is JobState.RUNNING
    return job


def complete_again_with(
    sessions: sessionmaker[Session], spool: Spool, dispatcher: Dispatcher, slices: int
) -> None:
    """More slices of the same series arrive: the study reopens, completes again and is
    routed while the job still runs."""
    later = NOW + dt.timedelta(minutes=1)
    add_series(spool, sessions, number=1, num_slices=slices, received_at=later)
    with sessions.begin() as session:
        assert complete_quiet_studies(session, 1.0, now=LATER)
    assert dispatcher.route_completed_studies() == 1


def derived_uids(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(
            session.scalars(
                select(Output.sop_instance_uid).where(Output.kind == OutputKind.DERIVED)
            )
        )


def test_a_study_completing_again_while_its_job_runs_runs_it_again_after_on_the_whole_series(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    seen: list[int] = []

    def run(spec: JobSpec) -> JobResult:
        seen.append(len(spec.paths))
        return run_job(spec)

    settings = settings_sending_to_pacs(tmp_path, ["gaussian"])
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(run))
    job = started_run(sessions, spool, dispatcher, slices=4)
    complete_again_with(sessions, spool, dispatcher, slices=6)
    with sessions.begin() as session:
        running = session.get(Job, job.id)
        assert running is not None
        assert (running.state, running.rerun_requested) == (JobState.RUNNING, True)
        assert claim_next(session, "another-node") is None  # never two runs at once

    dispatcher.collect()  # the first run ends: recorded, then queued again at once
    [job] = jobs(sessions)
    assert (job.state, job.attempts, job.rerun_requested) == (JobState.QUEUED, 0, False)
    first = derived_uids(sessions)
    assert len(first) == 4

    assert dispatcher.fill() == 1
    dispatcher.collect()
    [job] = jobs(sessions)
    assert (job.state, job.attempts, job.num_outputs) == (JobState.SUCCEEDED, 1, 6)
    assert seen == [4, 6]
    second = derived_uids(sessions) - first
    assert len(second) == 6  # the grown series' outputs are new objects, none reused
    with sessions() as session:
        files = {o.sop_instance_uid: o.path for o in session.scalars(select(Output))}
    for uid in first | second:  # each output's file is still its own (first run's kept)
        assert str(pydicom.dcmread(files[uid], stop_before_pixels=True).SOPInstanceUID) == uid
    with sessions() as session:
        exported = set(session.scalars(select(Export.sop_instance_uid)))
    assert exported == first | second  # the first run's outputs stay sent, not withdrawn
    assert dispatcher.fill() == 0  # and nothing runs a third time


def test_a_failed_run_with_a_rerun_asked_runs_again_with_fresh_attempts(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    runs: list[int] = []

    def fails_on_four_slices(spec: JobSpec) -> JobResult:
        runs.append(len(spec.paths))
        if len(spec.paths) < 5:
            raise ValueError("too few slices")
        return run_job(spec)

    settings = load_settings(
        None, data_dir=tmp_path / "data", rules=[CT_RULE], job_max_attempts=1, executor="inline"
    )
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(fails_on_four_slices))
    started_run(sessions, spool, dispatcher, slices=4)
    complete_again_with(sessions, spool, dispatcher, slices=5)
    dispatcher.collect()
    [job] = jobs(sessions)  # its only attempt failed, yet it runs again on the grown series
    assert (job.state, job.attempts, job.error) == (
        JobState.QUEUED,
        0,
        "ValueError: too few slices",
    )
    dispatcher.fill()
    dispatcher.collect()
    [job] = jobs(sessions)
    assert (job.state, runs) == (JobState.SUCCEEDED, [4, 5])


def test_a_job_cancelled_while_a_rerun_was_asked_stays_cancelled(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    settings = settings_sending_to_pacs(tmp_path, ["gaussian"])
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(run_job))
    job = started_run(sessions, spool, dispatcher, slices=4)
    complete_again_with(sessions, spool, dispatcher, slices=5)
    with sessions.begin() as session:
        cancel(session, job.id, actor=Actor.api_token("ops"))
    dispatcher.stop_cancelled()
    dispatcher.collect()
    assert dispatcher.fill() == 0
    [job] = jobs(sessions)
    assert job.state is JobState.CANCELLED


def test_the_run_on_a_grown_series_writes_beside_the_first_runs_files(tmp_path: Path) -> None:
    """The first run's files may still wait for export when the second run writes."""
    first = job_output_dir(tmp_path, 7, ["b.dcm", "a.dcm"])
    assert first == job_output_dir(tmp_path, 7, ["a.dcm", "b.dcm"])  # a retry: the same
    assert first.parent == tmp_path / "job-7"
    assert job_output_dir(tmp_path, 7, ["a.dcm", "b.dcm", "c.dcm"]) != first
