"""The chaos suite of issue 18 at CI sizes (``bench/chaos.py`` runs the full sizes): many
senders at once, the PACS down during export, and ``kill -9`` of the node at random
moments. Each checks that nothing acknowledged is lost and that every output is in the
PACS exactly once (``dicom_node.testing_chaos`` says how a second send is counted).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dicom_node.testing_chaos import Census
from dicom_node.testing_chaos_runs import kill_run, load_run, pacs_down_run

# A node, its Dask workers and Orthanc, started again after each kill: about a minute
# each on an idle 2-core machine, five times that when the machine is shared.
pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(900)]


def assert_exactly_once(
    result: Census, studies: int, instances: int, *, grown: bool = False
) -> None:
    """``grown``: a series may have grown after its study completed (a sender re-sending
    after a kill), so an earlier run's outputs may stand beside the last run's."""
    print("\n".join(result.lines()))
    assert result.acknowledged == result.in_spool == result.in_index == studies * instances
    assert result.spool_total == result.index_total == studies * instances
    assert result.lost == 0
    assert result.studies == result.jobs_succeeded == studies
    assert result.series_not_covered == {}  # each job saw every instance of its series
    assert result.outputs > studies * instances  # a derived series, SEGs and an SR each
    assert result.delivered == result.in_pacs == result.outputs
    assert result.duplicates == 0
    if not grown:  # each job's one input set gives one set of output UIDs, however often run
        assert result.extra_outputs == 0


def test_eight_senders_at_once_every_instance_stored_indexed_and_processed(
    tmp_path: Path,
) -> None:
    result = load_run(tmp_path, senders=8, instances=25)
    assert_exactly_once(result, studies=8, instances=25)
    assert result.resends == 0  # nothing went wrong, so nothing was sent twice


def test_pacs_down_during_export_every_output_delivered_once_after_it_returns(
    tmp_path: Path,
) -> None:
    result = pacs_down_run(tmp_path, outage_seconds=30, instances=25)
    assert_exactly_once(result, studies=1, instances=25)
    [recover] = result.recover_seconds
    assert recover < 30, result.notes  # not left waiting out a long backoff


def test_kill_9_at_random_moments_loses_nothing_and_delivers_each_output_once(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(2**32)))
    print(f"CHAOS_SEED={seed}")  # to reproduce a failure
    result = kill_run(
        tmp_path,
        studies=3,
        kill_points=["association", "job", "export"],
        instances=20,
        seed=seed,
    )
    assert result.kills == 3, result.notes
    assert_exactly_once(result, studies=3, instances=20, grown=True)
