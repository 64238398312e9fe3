"""2-D images through the node's own path (index -> assembler -> routing -> job): a study
of a single radiograph completes and runs like any other, and a job whose pipeline cannot
take its images fails before any step runs, at once, with the reason."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Export, JobState, Output, StudyEvent
from dicom_node.assembler import complete_quiet_studies
from dicom_node.config import Settings, load_settings
from dicom_node.index import stored_record_from_file, write_batch
from dicom_node.jobs.worker import run_job
from dicom_node.queries.jobs import JobFilters, search_jobs
from dicom_node.queries.paging import EVERYTHING
from dicom_node.storage import InstanceKey, Spool
from tests.dicom_node import test_routing
from tests.dicom_node.jobs.test_state import dispatch_once, jobs
from tests.dicom_node.test_image import CR
from tests.dicom_node.test_routing import PACS

sessions = test_routing.sessions
spool = test_routing.spool

REPO = Path(__file__).resolve().parents[3]
RECEIVED = dt.datetime(2026, 1, 15, 10, 0, tzinfo=dt.UTC)
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def receive(spool: Spool, sessions: sessionmaker[Session], source: Path) -> tuple[str, Path]:
    """Spool and index ``source`` as the receiver would, as a study of its own; returns
    its SOP Instance UID and spooled file."""
    dataset = pydicom.dcmread(source)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    key = InstanceKey.checked(
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID
    )
    written = spool.root.parent / "incoming.dcm"
    dataset.save_as(written, enforce_file_format=True)
    path, _ = spool.write(key, [written.read_bytes()])
    with sessions.begin() as session:
        write_batch(session, [stored_record_from_file(path, RECEIVED, None)])
    return str(dataset.SOPInstanceUID), path


def example_rule(name: str) -> dict[str, Any]:
    """A rule of config/rules.example.toml as written there, sending to "pacs"."""
    example = tomllib.loads((REPO / "config" / "rules.example.toml").read_text())
    [rule] = [rule for rule in example["rules"] if rule["name"] == name]
    return {**rule, "destinations": ["pacs"]}


def inline_settings(tmp_path: Path, rule: dict[str, Any], **values: Any) -> Settings:
    return load_settings(
        None,
        data_dir=tmp_path / "data",
        destinations=[PACS],
        rules=[rule],
        executor="inline",
        **values,
    )


def test_a_study_of_one_radiograph_completes_and_goes_through_the_cr_rule(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    source_uid, _ = receive(spool, sessions, CR)
    with sessions.begin() as session:  # quiet for 59 s of 60: still receiving
        early = RECEIVED + dt.timedelta(seconds=59)
        assert complete_quiet_studies(session, 60.0, now=early) == []
    settings = inline_settings(tmp_path, example_rule("cr-radiograph"))
    dispatch_once(sessions, settings, run_job)  # completes it 15 years later
    with sessions() as session:
        [event] = session.scalars(select(StudyEvent)).all()
        outputs = list(session.scalars(select(Output)))
        exports = list(session.scalars(select(Export)))
    assert (event.event, event.num_instances) == ("complete", 1)
    [job] = jobs(sessions)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.rule_name == "cr-radiograph" and job.num_outputs == len(outputs)
    classes = [output.sop_class_uid for output in outputs]
    assert classes.count(SEGMENTATION) >= 1 and classes.count(COMPREHENSIVE_3D_SR) >= 1
    assert "derived" in {output.kind for output in outputs}  # the CLAHE image
    assert {e.output_id for e in exports} == {o.id for o in outputs}
    seg = next(pydicom.dcmread(o.path) for o in outputs if o.sop_class_uid == SEGMENTATION)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source_uid


def test_a_job_whose_step_cannot_take_its_images_fails_at_once_before_any_step(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    """A rule that does not say which modality it takes is accepted at start-up; its job
    meets the radiograph and refuses it on load, without using its other attempts."""
    receive(spool, sessions, CR)
    anything = {"name": "anything", "pipeline": ["gaussian", "unet"], "destinations": ["pacs"]}
    settings = inline_settings(tmp_path, anything, job_max_attempts=3)
    dispatch_once(sessions, settings, run_job)
    [job] = jobs(sessions)
    assert (job.state, job.attempts, job.max_attempts) == (JobState.FAILED, 1, 3)
    assert job.error is not None
    assert job.error.startswith("unet takes 3-D volumes only, and this is a 2-D image")
    with sessions() as session:
        assert list(session.scalars(select(Output))) == []
        failed = search_jobs(session, JobFilters(state=JobState.FAILED), EVERYTHING).items
        assert [row.error for row in failed] == [job.error]  # `dicom-node jobs --state failed`
    assert list((tmp_path / "data" / "outputs").rglob("*.dcm")) == []


def test_a_failure_that_another_attempt_may_cure_is_still_retried(
    sessions: sessionmaker[Session], spool: Spool, tmp_path: Path
) -> None:
    _, path = receive(spool, sessions, CR)
    settings = inline_settings(tmp_path, example_rule("cr-radiograph"), job_max_attempts=2)

    def source_gone(spec: Any) -> Any:
        path.unlink()  # a missing file is a JobError, not a refusal of the images
        return run_job(spec)

    dispatch_once(sessions, settings, source_gone)
    [job] = jobs(sessions)
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.error is not None and "a source file is missing" in job.error
