"""The gateway's OpenAPI document, as committed in openapi.yaml (a test checks they match)."""

from __future__ import annotations

import yaml

from service.contract.settings import Settings
from service.gateway.app import create_app


def openapi_dict() -> dict:
    # Building the schema touches neither Redis nor storage; a throwaway directory keeps it side-effect free.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return create_app(Settings(storage_url=f"file://{tmp}", allow_anonymous=True)).openapi()


def openapi_yaml() -> str:
    return yaml.safe_dump(openapi_dict(), sort_keys=False, allow_unicode=True, width=110)
