"""schemathesis over the committed openapi.yaml against the running stack: no 5xx, and every response conforms
to the schema (status codes, content types, bodies, headers). Bounded, so it stays fast."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.contract.lifecycle import Lifecycle
from tests.conftest import ROOT

schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_stack(stack):
    yield stack
    # Valid random requests became real jobs: cancel what is left so later tests get the workers back.
    for video_id in stack.store.r.zrange(f"k5:videos:{stack.owner}", 0, -1):
        Lifecycle(stack.store).cancel(video_id.decode())


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_openapi(case, fuzz_stack):
    headers = {"Authorization": f"Bearer {fuzz_stack.api_key}"}
    case.call_and_validate(base_url=fuzz_stack.base_url, headers=headers, checks=CHECKS, allow_redirects=False)
