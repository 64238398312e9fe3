"""The API keeps the contract ``/openapi.json`` states (schemathesis): no 5xx for any input
the schema allows or forbids, every status code and body documented, bad input refused
with a 4xx, and no route that ignores a missing token. Examples are bounded for CI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as base_checks
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi import checks as openapi_checks

from db.enums import TokenRole
from dicom_node.api.testing import ApiHarness, api_harness, settings_for

EXAMPLES_PER_OPERATION = 15

CONTRACT_CHECKS = [
    base_checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
]


@pytest.fixture
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiHarness]:
    with api_harness(settings_for(tmp_path_factory.mktemp("contract"))) as api:
        yield api


def operations(harness: ApiHarness) -> list[APIOperation]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", harness.client.app)
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_keeps_the_contract(harness: ApiHarness) -> None:
    headers = harness.headers(TokenRole.ADMIN)
    failures: dict[str, str] = {}
    tried = []
    for operation in operations(harness):

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def keeps_the_contract(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers, checks=CONTRACT_CHECKS)

        tried.append(operation.label)
        try:
            keeps_the_contract()
        except Exception as exc:  # every operation's failure, not only the first
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert tried
    assert not failures, "\n\n".join(f"{label}: {error}" for label, error in failures.items())


def test_the_schema_lists_every_route(harness: ApiHarness, tmp_path: Path) -> None:
    document = harness.client.get("/openapi.json").json()
    paths = set(document["paths"])
    assert {"/healthz", "/readyz"} <= paths
