"""A job that does what its test asks (``outputs/job-N.do``), for the executor fault tests.

Its own small module: a worker that runs it imports this and the worker module only, not
the test modules (seconds on a loaded machine, which a job's timeout would count).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dicom_node.jobs.worker import JobResult, JobSpec, worker_name


def behave(job: JobSpec) -> JobResult:
    """``hang``, ``exit``, ``hog`` (memory until the nanny stops the worker) or
    ``sleep SECONDS``."""
    job_folder = Path(job.output_dir).parent  # outputs/job-N/<digest of its input>
    what, *args = job_folder.with_name(job_folder.name + ".do").read_text().split()
    if what == "hang":
        time.sleep(600)
    elif what == "exit":
        os._exit(3)
    elif what == "hog":
        hoard = []
        for _ in range(40):  # 100 MB (written) at a time: the nanny stops it well before 4 GB
            hoard.append(b"\x01" * (100 * 2**20))
            time.sleep(0.1)
        raise MemoryError("the nanny did not stop a worker past its memory limit")
    else:
        time.sleep(float(args[0]))
    return JobResult(job.job_id, (), (("behave", 0.0),), worker_name())
