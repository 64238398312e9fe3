"""The searches of studies, jobs and exports on PostgreSQL (the JSON pipeline, the
correlated filters, the grouped counts), the same answers as on SQLite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dicom_node.api.testing import api_harness
from dicom_node.storage import Spool
from dicom_node.testing_postgres import fresh_postgres_database
from tests.dicom_node.api.resource_support import (
    OTHER_STUDY_UID,
    STUDY_UID,
    dispatcher_with_jobs,
    get,
    index_studies,
    run_all,
    settings_with_ct_rule,
)


@pytest.mark.postgres
def test_searches_on_postgresql(tmp_path: Path) -> None:
    url = fresh_postgres_database()  # on the run's one server
    settings = settings_with_ct_rule(tmp_path, database_url=url)
    with api_harness(settings) as api:
        studies = index_studies(api, Spool(tmp_path / "spool", fsync=False))
        run_all(dispatcher_with_jobs(api, settings))

        def found(path: str, key: str, **params: object) -> list[Any]:
            page: Any = get(api, path, **params)
            assert page["total"] == len(page["items"])
            return [item[key] for item in page["items"]]

        uid = "study_instance_uid"
        assert found("/studies", uid, calling_ae_title="MR_SCANNER") == [STUDY_UID]
        assert found("/studies", uid, modality="CT") == [OTHER_STUDY_UID, STUDY_UID]
        assert found("/studies", uid, study_date_from="2026-02-01") == [OTHER_STUDY_UID]
        assert found("/studies", uid, received_to="2026-01-20T00:00:00Z") == [STUDY_UID]
        assert len(found("/jobs", "id", processor="median")) == 2
        assert found("/jobs", "id", processor="med") == []
        assert found("/jobs", "series_instance_uid", study=STUDY_UID) == [studies.ct]
        assert len(found("/exports", "id", study=OTHER_STUDY_UID, state="pending")) == 8
        detail: Any = get(api, f"/studies/{STUDY_UID}")
        assert [s["num_instances"] for s in detail["series"]] == [4, 4]
        assert len(detail["outputs"]) == len(detail["exports"]) == 8
