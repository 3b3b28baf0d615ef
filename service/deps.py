"""Typed dependency aliases: routes ask for what they need, the app factory decides what it is."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.jobs import JobStore
from service.settings import Settings
from service.storage import Storage


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> JobStore:
    return request.app.state.store


def _storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
StorageDep = Annotated[Storage, Depends(_storage)]
