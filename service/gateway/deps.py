"""Typed dependency aliases: routes ask for what they need, the app factory decides what it is.

Those that do no I/O are coroutines: FastAPI runs a plain function dependency in its threadpool, a hop that
cost a small request more than a Redis round trip."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.contract.jobs import JobStore
from service.contract.problems import Unauthenticated
from service.contract.ratelimit import Charge
from service.contract.settings import Settings
from service.contract.storage import Storage
from service.gateway.auth import AuthError
from service.gateway.roster import Roster


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _store(request: Request) -> JobStore:
    return request.app.state.store


async def _storage(request: Request) -> Storage:
    return request.app.state.storage


async def _roster(request: Request) -> Roster:
    return request.app.state.roster


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
StorageDep = Annotated[Storage, Depends(_storage)]
RosterDep = Annotated[Roster, Depends(_roster)]


async def _caller(
    request: Request,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Charge:
    """Authenticate the bearer key (no I/O: a digest looked up in memory): the caller's Charge, its request not
    counted yet. The error handlers count a refused request that nothing counted (errors.settle)."""
    try:
        owner = request.app.state.keys.authenticate(authorization)
    except AuthError as e:
        raise Unauthenticated(str(e)) from e
    charge = request.state.charge = request.app.state.limits.charge(owner)
    return charge


def _owner(charge: Annotated[Charge, Depends(_caller)]) -> str:
    """The caller's key, its request counted against the key's rate limit (one round trip, in the threadpool)."""
    charge.now()
    return charge.owner


# The id of the caller's API key ("anonymous" without keys), the request counted: what most /v1 routes ask for.
OwnerDep = Annotated[str, Depends(_owner)]
# The caller's key and its request's count, not taken yet: for a route whose own script counts it (a hot route,
# to spare a round trip); it must hand `take()` to that script, or call `now()` before any other Redis work.
CallerDep = Annotated[Charge, Depends(_caller)]
