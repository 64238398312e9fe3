"""Jobs: the state machine, making jobs from routing, claiming, recovery; the dispatcher
with the inline executor (outputs and exports recorded with the job)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    Export,
    ExportState,
    Job,
    JobState,
    Output,
    StudyEvent,
    as_utc,
)
from db.testing import writer_gets_in_first
from dicom_node.assembler import complete_quiet_studies
from dicom_node.config import Settings, load_settings
from dicom_node.jobs.dispatcher import Dispatcher
from dicom_node.jobs.executors import InlineExecutor, JobFuture
from dicom_node.jobs.state import (
    InvalidTransitionError,
    cancel,
    claim_next,
    consume_completed_studies,
    create_jobs,
    requeue_interrupted,
    retry,
    transition,
)
from dicom_node.jobs.worker import JobResult, JobSpec, run_job, written_steps
from dicom_node.plugin_state import set_state
from dicom_node.routing_store import sync_from_settings
from dicom_node.security.audit import Actor, AuditAction
from dicom_node.storage import Spool
from tests.dicom_node import test_routing
from tests.dicom_node.security.audit_support import audit_rows
from tests.dicom_node.test_routing import PACS, add_series, settings_with, study_id

LATER = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)

# The same fixtures as the routing tests: a migrated SQLite database and a spool.
sessions = test_routing.sessions
spool = test_routing.spool


CT_RULE = {"name": "ct", "match": {"Modality": "CT"}, "pipeline": ["gaussian"]}


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def make_jobs(sessions: sessionmaker[Session], settings: Settings) -> list[Job]:
    with sessions.begin() as session:
        return create_jobs(session, settings, study_id(sessions), LATER)


def test_transitions_follow_the_life_cycle(sessions: sessionmaker[Session], spool: Spool) -> None:
    add_series(spool, sessions, number=1)
    [job] = make_jobs(sessions, settings_with(CT_RULE))
    with sessions.begin() as session:
        with pytest.raises(InvalidTransitionError, match="from queued to succeeded"):
            transition(session, job.id, JobState.SUCCEEDED, expected=JobState.QUEUED)
        assert not transition(session, job.id, JobState.QUEUED, expected=JobState.FAILED)
        assert transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        assert not transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        assert transition(session, job.id, JobState.FAILED, expected=JobState.RUNNING, error="x")
        with pytest.raises(InvalidTransitionError):
            transition(session, job.id, JobState.RUNNING, expected=JobState.FAILED)
    assert jobs(sessions)[0].state is JobState.FAILED


def test_a_job_per_matched_series_and_rule_with_a_copy_of_the_rule(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    add_series(spool, sessions, number=2, modality="MR")
    rule = {**CT_RULE, "params": {"gaussian": {"sigma_mm": 2.0}}, "destinations": ["pacs"]}
    settings = settings_with(rule, {"name": "all", "pipeline": ["median"], "priority": 5})
    made = make_jobs(sessions, settings)
    assert sorted((j.rule_name, j.state) for j in made) == [
        ("all", JobState.QUEUED),
        ("all", JobState.QUEUED),
        ("ct", JobState.QUEUED),
    ]
    ct = next(j for j in jobs(sessions) if j.rule_name == "ct")  # read back from the database
    assert ct.state is JobState.QUEUED
    assert ct.pipeline == ["gaussian"]
    assert ct.params == {"gaussian": {"sigma_mm": 2.0}}
    assert ct.destinations == ["pacs"]
    assert ct.step_timings is None
    # The study completes again: finished jobs are queued again, running ones marked to run
    # again when their run ends (tests/dicom_node/jobs/test_state_rerun.py).
    with sessions.begin() as session:
        transition(session, ct.id, JobState.RUNNING, expected=JobState.QUEUED)
        transition(session, ct.id, JobState.SUCCEEDED, expected=JobState.RUNNING)
        other = next(j for j in made if j.rule_name == "all")
        transition(session, other.id, JobState.RUNNING, expected=JobState.QUEUED, attempts=1)
    again = make_jobs(sessions, settings)
    assert len(jobs(sessions)) == 3
    assert {ct.id, other.id} <= {j.id for j in again}
    states = {j.id: (j.state, j.rerun_requested) for j in jobs(sessions)}
    assert states[ct.id] == (JobState.QUEUED, False)
    assert states[other.id] == (JobState.RUNNING, True)


def test_another_node_making_the_same_job_meanwhile_is_not_an_error(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    """Two nodes route the same study at once: one job, queued once, for both of them."""
    add_series(spool, sessions, number=1)
    settings = settings_with(CT_RULE)
    target = study_id(sessions)
    engine = sessions.kw["bind"]

    def other_node(other: Session) -> None:
        create_jobs(other, settings, target, LATER)

    with writer_gets_in_first(engine, "jobs", other_node) as race:
        [job] = make_jobs(sessions, settings)
    assert race.happened
    [stored] = jobs(sessions)
    assert (stored.id, stored.state, stored.attempts) == (job.id, JobState.QUEUED, 0)


def test_claim_by_priority_then_age_and_only_when_due(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    settings = settings_with(CT_RULE, {"name": "urgent", "pipeline": ["median"], "priority": 9})
    make_jobs(sessions, settings)
    with sessions.begin() as session:
        assert claim_next(session, "node-a", now=LATER - dt.timedelta(days=4000)) is None
        first = claim_next(session, "node-a", now=LATER)
        second = claim_next(session, "node-b", now=LATER)
        assert claim_next(session, "node-a", now=LATER) is None
    assert first is not None and second is not None
    assert (first.rule_name, first.attempts, first.claimed_by) == ("urgent", 1, "node-a")
    assert second.rule_name == "ct"
    with sessions.begin() as session:
        assert requeue_interrupted(session, "node-a") == [first.id]
    states = {j.id: (j.state, j.claimed_by) for j in jobs(sessions)}
    assert states == {first.id: ("queued", None), second.id: ("running", "node-b")}


def test_retry_requeues_finished_jobs_only(sessions: sessionmaker[Session], spool: Spool) -> None:
    add_series(spool, sessions, number=1)
    [job] = make_jobs(sessions, settings_with(CT_RULE))
    with sessions.begin() as session:
        with pytest.raises(InvalidTransitionError, match="queued; nothing to retry"):
            retry(session, job.id)
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED, attempts=1)
        transition(session, job.id, JobState.FAILED, expected=JobState.RUNNING, error="boom")
        retried = retry(session, job.id)
        assert retry(session, 999) is None
        # A job left running by a node that is gone: only with force.
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED, claimed_by="gone")
        with pytest.raises(InvalidTransitionError, match="--force takes a job"):
            retry(session, job.id)
        forced = retry(session, job.id, force=True)
        assert forced is not None and (forced.state, forced.claimed_by) == ("queued", None)
    assert retried is not None
    assert (retried.state, retried.attempts, retried.error) == ("queued", 0, None)


def test_completed_studies_are_consumed_once(sessions: sessionmaker[Session], spool: Spool) -> None:
    add_series(spool, sessions, number=1)
    with sessions.begin() as session:
        complete_quiet_studies(session, 1.0, now=LATER)
    with sessions.begin() as session:
        assert consume_completed_studies(session) == [study_id(sessions)]
    with sessions.begin() as session:
        assert consume_completed_studies(session) == []
        assert session.scalars(select(StudyEvent.consumed_at)).one() is not None


def test_reply_to_sender_adds_the_destination_with_the_senders_ae_title(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1, calling_ae="CT_SCANNER")
    scanner = {"name": "scanner", "host": "10.0.0.5", "port": 104, "ae_title": "CT_SCANNER"}
    settings = load_settings(
        None,
        destinations=[PACS, scanner],
        rules=[{**CT_RULE, "destinations": ["pacs"], "reply_to_sender": True}],
    )
    [job] = make_jobs(sessions, settings)
    assert job.destinations == ["pacs", "scanner"]


def dispatch_once(
    sessions: sessionmaker[Session], settings: Settings, run: Callable[[JobSpec], JobResult]
) -> Dispatcher:
    """Complete the study, then one dispatcher round: route, submit (inline), collect."""
    with sessions.begin() as session:
        sync_from_settings(session, settings)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(run))
    dispatcher.reload_routing(force=True)
    assert dispatcher.route_completed_studies() == 1
    dispatcher.fill()
    dispatcher.collect()
    return dispatcher


def settings_sending_to_pacs(tmp_path: Path, pipeline: list[str]) -> Settings:
    """Inline execution of ``pipeline`` on CT, every output for the destination "pacs"."""
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        destinations=[PACS],
        rules=[{**CT_RULE, "pipeline": pipeline, "destinations": ["pacs"]}],
        executor="inline",
    )


def test_dispatcher_runs_the_job_and_records_outputs_and_exports(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    add_series(spool, sessions, number=1, num_slices=6)
    settings = settings_sending_to_pacs(tmp_path, ["gaussian", "threshold_segment"])
    dispatch_once(sessions, settings, run_job)
    [job] = jobs(sessions)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.worker and job.finished_at is not None
    steps = [t["step"] for t in job.step_timings or []]
    assert sorted(steps) == sorted(
        [
            "load",
            "gaussian:run",
            "gaussian:encode",  # on the encoder thread, while threshold_segment runs
            "threshold_segment:run",
            "threshold_segment:encode",
            "encode:wait",
        ]
    )
    assert steps[0] == "load" and steps[-1] == "encode:wait"
    with sessions() as session:
        outputs = list(session.scalars(select(Output)))
        exports = list(session.scalars(select(Export)))
    assert job.num_outputs == len(outputs) > 6
    assert {o.job_id for o in outputs} == {job.id}
    assert {e.output_id for e in exports} == {o.id for o in outputs}
    assert {(e.destination, e.state) for e in exports} == {("pacs", ExportState.PENDING)}
    assert all(Path(o.path).is_file() for o in outputs)


@pytest.mark.parametrize(
    ("choice", "reason"),
    [
        ({"enabled": False}, "processor 'gaussian' is disabled"),
        ({"pinned_version": "0.0.1"}, "pinned to version 0.0.1"),
    ],
)
def test_a_job_does_not_run_a_processor_the_admin_disabled_or_pinned_away(
    sessions: sessionmaker[Session],
    spool: Spool,
    tmp_path: Path,
    choice: dict[str, object],
    reason: str,
) -> None:
    add_series(spool, sessions, number=1, num_slices=4)
    settings = settings_sending_to_pacs(tmp_path, ["gaussian"])
    with sessions.begin() as session:
        set_state(session, "gaussian", **choice)  # type: ignore[arg-type]
    dispatch_once(sessions, settings, run_job)
    [job] = jobs(sessions)
    assert job.state is JobState.FAILED
    assert job.error is not None and reason in job.error
    with sessions() as session:
        assert list(session.scalars(select(Output))) == []


def test_dispatcher_retries_a_failed_attempt_then_fails_the_job(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    add_series(spool, sessions, number=1)
    settings = load_settings(
        None, data_dir=tmp_path / "data", rules=[CT_RULE], job_max_attempts=2, executor="inline"
    )

    def broken(spec: JobSpec) -> JobResult:
        raise ValueError(f"job {spec.job_id} cannot run")

    dispatcher = dispatch_once(sessions, settings, broken)
    [job] = jobs(sessions)
    assert (job.state, job.attempts, job.error) == ("queued", 1, "ValueError: job 1 cannot run")
    assert as_utc(job.not_before) > dt.datetime.now(dt.UTC)  # retried after a backoff
    with sessions.begin() as session:
        session.get(Job, job.id).not_before = LATER - dt.timedelta(days=4000)  # type: ignore[union-attr]
    dispatcher.fill()
    dispatcher.collect()
    [job] = jobs(sessions)
    assert (job.state, job.attempts) == ("failed", 2)
    assert job.error == "ValueError: job 1 cannot run"


def test_outputs_of_finished_steps_are_sent_even_when_a_later_step_fails(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    add_series(spool, sessions, number=1, num_slices=6)
    settings = settings_sending_to_pacs(tmp_path, ["gaussian", "median"])

    def first_step_then_crash(spec: JobSpec) -> JobResult:
        from dicom_node.jobs import worker

        first = worker.run_job(replace(spec, pipeline=("gaussian",)))
        raise RuntimeError(f"median broke after {len(first.records)} outputs")

    dispatch_once(sessions, settings, first_step_then_crash)
    [job] = jobs(sessions)
    assert (job.state, job.error) == ("failed", "RuntimeError: median broke after 6 outputs")
    [run_dir] = (tmp_path / "data" / "outputs" / f"job-{job.id}").iterdir()
    steps = written_steps(run_dir, set())
    assert [(name, len(records)) for name, records in steps] == [("01.json", 6)]
    with sessions() as session:
        exported = session.scalars(select(Export.sop_instance_uid)).all()
    assert sorted(exported) == sorted(r.sop_instance_uid for r in steps[0][1])


class BrokenExecutor(InlineExecutor):
    def submit(self, spec: JobSpec, *, gpu: bool = False) -> JobFuture:
        raise OSError("scheduler at tcp://10.0.0.9:8786 unreachable")


def test_a_job_the_executor_cannot_take_is_queued_again_without_using_an_attempt(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    add_series(spool, sessions, number=1)
    settings = load_settings(None, data_dir=tmp_path / "data", rules=[CT_RULE], executor="inline")
    with sessions.begin() as session:
        sync_from_settings(session, settings)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher = Dispatcher(settings, sessions, BrokenExecutor())
    dispatcher.reload_routing(force=True)
    dispatcher.route_completed_studies()
    assert dispatcher.fill() == 0
    [job] = jobs(sessions)
    assert (job.state, job.attempts) == ("queued", 0)
    assert job.error == "could not submit: scheduler at tcp://10.0.0.9:8786 unreachable"


def test_each_run_that_ends_is_audited_with_its_outcome_in_its_transition(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    series_uid = add_series(spool, sessions, number=1)
    [job] = make_jobs(sessions, settings_with(CT_RULE))
    with sessions.begin() as session:
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        transition(session, job.id, JobState.QUEUED, expected=JobState.RUNNING, error="died")
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        transition(session, job.id, JobState.FAILED, expected=JobState.RUNNING, error="bad input")
    with sessions.begin() as session:
        retry(session, job.id)  # an operator's retry is not a run
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        transition(session, job.id, JobState.SUCCEEDED, expected=JobState.RUNNING, worker="w-1")
    with pytest.raises(RuntimeError), sessions.begin() as session:
        retry(session, job.id)
        transition(session, job.id, JobState.RUNNING, expected=JobState.QUEUED)
        transition(session, job.id, JobState.SUCCEEDED, expected=JobState.RUNNING)
        raise RuntimeError("the transaction fails: neither the change nor its row")
    runs = audit_rows(sessions, AuditAction.JOB_RAN)
    assert [(row["outcome"], row["reason"]) for row in runs] == [
        ("retrying", "died"),
        ("failure", "bad input"),
        ("success", None),
    ]
    assert {(row["object_kind"], row["object_id"]) for row in runs} == {("job", str(job.id))}
    assert {row["series_instance_uid"] for row in runs} == {series_uid}
    assert {row["study_instance_uid"] for row in runs} == {test_routing.STUDY_UID}
    assert runs[-1]["details"] == {"rule": "ct", "worker": "w-1"}
    [asked] = audit_rows(sessions, AuditAction.RETRY_REQUESTED)
    assert (asked["actor_kind"], asked["object_id"], asked["series_instance_uid"]) == (
        "os_user",
        str(job.id),
        series_uid,
    )


def test_a_cancelled_job_stays_cancelled_when_its_study_completes_again(
    sessions: sessionmaker[Session], spool: Spool
) -> None:
    add_series(spool, sessions, number=1)
    settings = settings_with(CT_RULE)
    [job] = make_jobs(sessions, settings)
    with sessions.begin() as session:
        cancel(session, job.id, actor=Actor.api_token("ops"))
    assert make_jobs(sessions, settings) == []
    assert [(j.id, j.state) for j in jobs(sessions)] == [(job.id, JobState.CANCELLED)]


def test_a_cancel_that_commits_just_before_the_dispatcher_records_the_job_wins(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    """Another node's operator cancels the job between its run's end and the dispatcher's
    recording of it: the dispatcher records none of its outputs, sends nothing."""
    add_series(spool, sessions, number=1)
    settings = settings_sending_to_pacs(tmp_path, ["gaussian"])
    with sessions.begin() as session:
        sync_from_settings(session, settings)
        complete_quiet_studies(session, 1.0, now=LATER)
    dispatcher = Dispatcher(settings, sessions, InlineExecutor(run_job))
    dispatcher.reload_routing(force=True)
    dispatcher.route_completed_studies()
    assert dispatcher.fill() == 1
    [job] = jobs(sessions)
    engine = sessions.kw["bind"]
    cancelled: list[int] = []

    def cancel_first(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not cancelled and statement.lstrip().startswith("UPDATE jobs"):
            cancelled.append(job.id)
            with Session(engine) as other, other.begin():
                cancel(other, job.id, actor=Actor.api_token("ops"))

    event.listen(engine, "before_cursor_execute", cancel_first)
    try:
        dispatcher.collect()
    finally:
        event.remove(engine, "before_cursor_execute", cancel_first)
    assert cancelled == [job.id]
    assert [(j.state, j.num_outputs) for j in jobs(sessions)] == [(JobState.CANCELLED, 0)]
    with sessions() as session:
        assert (session.scalars(select(Output)).all(), session.scalars(select(Export)).all()) == (
            [],
            [],
        )
