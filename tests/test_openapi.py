"""The committed openapi.yaml is what the app serves."""

from __future__ import annotations

import yaml

from service.gateway.openapi import openapi_dict, openapi_yaml
from tests.conftest import ROOT


def test_committed_openapi_matches_the_app():
    committed = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    assert committed == openapi_dict(), "openapi.yaml is stale: run `make openapi` and commit it"
    assert (ROOT / "openapi.yaml").read_text() == openapi_yaml()


def test_every_route_documents_its_errors_with_the_envelope():
    spec = openapi_dict()
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in ops.items():
            errors = {code: r for code, r in op["responses"].items() if code.startswith(("4", "5"))}
            assert errors, f"{method} {path} documents no error response"
            for code, resp in errors.items():
                ref = resp["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
