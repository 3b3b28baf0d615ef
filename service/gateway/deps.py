"""Typed dependency aliases: routes ask for what they need, the app factory decides what it is."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.contract.jobs import JobStore
from service.contract.problems import Unauthenticated
from service.contract.settings import Settings
from service.contract.storage import Storage
from service.gateway.auth import AuthError
from service.gateway.roster import Roster


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _roster(request: Request) -> Roster:
    return request.app.state.roster


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
StorageDep = Annotated[Storage, Depends(_storage)]
RosterDep = Annotated[Roster, Depends(_roster)]


def _owner(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> str:
    """Authenticate the bearer key and count the request against the key's rate limit."""
    try:
        owner = request.app.state.keys.authenticate(authorization)
    except AuthError as e:
        raise Unauthenticated(str(e)) from e
    request.app.state.limits.check_rate(owner)
    return owner


# The id of the caller's API key ("anonymous" without keys); every /v1 route depends on it.
OwnerDep = Annotated[str, Depends(_owner)]
